"""The GPU check in one command: what a GPU node must show before anyone trusts our numbers there.

    tools/device_check.sh                    # on the GPU node (air-gapped: installs the carried wheels)
    tools/device_check.sh --device cpu       # the same steps on a CPU, CI-sized (so the check cannot rot)

Steps, each timed and recorded (a failing step is reported; the others still run):
1. ``stack``      versions, the mmcv ops backend (compiled or torchvision) and the GPU.
2. ``selfcheck``  tools/selfcheck.py on CPU and the device: the miniature-world Mask R-CNN at W4A4,
                  box/mask AP on each (so the CPU-vs-device AP difference), calibration time,
                  quantized/float forward, largest feature difference from the CPU run.
3. ``tests``      the test suite's device parametrizations (``-k cuda``: real CUDA where there is a
                  GPU, the fake-CUDA and device-audit tests everywhere) and the mmcv ops tests.
4. ``speed``      bench/calibration_speed.py: Swin-T Mask R-CNN at 1333x800 (random weights, a real
                  COCO image): calibration / float forward and quantized / float forward.
5. ``reconstruct`` one reconstruction step of one Swin block (seconds per Adam step per unit).

One summary at the end; everything in ``--json``. The targets a GPU node must meet: calibration
<= 1.5x a float forward, quantized forward <= 1.10x float, |AP(cuda) - AP(cpu)| <= 0.3.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = {'calib_over_fp': 1.5, 'quant_over_fp': 1.10, 'ap_diff': 0.3}
COCO_IMAGE = (
    Path(os.environ.get('MMDET_LRPQ_SHARED_DATA', REPO.parent / 'shared' / 'data'))
    / 'coco_mini'
    / 'val2017'
    / '000000397133.jpg'
)


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **(env or {}))
        )
        return proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b'').decode() if isinstance(err.stdout, bytes) else (err.stdout or '')
        return 124, out + f'\n(timed out after {timeout:.0f}s)'


def step_stack(device: str) -> dict:
    import torch

    from mmdet_lrpq.env import check_openmmlab_stack, stack_report

    report = stack_report()
    check_openmmlab_stack(report)
    if device == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError('--device cuda, but torch sees no GPU (torch.cuda.is_available() is False)')
    return {
        k: report.get(k)
        for k in (
            'python',
            'torch',
            'torch_cuda',
            'cuda_devices',
            'torchvision',
            'timm',
            'mmengine',
            'mmcv',
            'mmcv_dist',
            'mmcv_ops_backend',
            'mmdet',
        )
    }


def step_selfcheck(device: str, quick: bool, work: Path) -> dict:
    out = work / 'selfcheck.json'
    cmd = [sys.executable, 'tools/selfcheck.py', '--device', 'all' if device == 'cuda' else 'cpu', '--json', str(out)]
    code, log = _run(cmd + (['--quick'] if quick else []), timeout=420)
    if not out.exists():
        raise RuntimeError(f'selfcheck wrote no results (exit {code}):\n{log[-1500:]}')
    results = {r['device']: r for r in json.load(open(out))['results']}
    summary: dict = {'exit': code, 'results': results}
    if 'cuda' in results and 'cpu' in results and results['cuda'].get('ok') and results['cpu'].get('ok'):
        summary['ap_diff'] = max(
            abs(results['cuda'][k] - results['cpu'][k])
            for k in ('box_ap', 'mask_ap')
            if results['cuda'].get(k) is not None
        )
    if code != 0:
        raise RuntimeError(f'selfcheck failed (exit {code}):\n{log[-1500:]}')
    return summary


def step_tests(device: str, quick: bool) -> dict:
    # On a GPU: every CUDA parametrization and device test; on a CPU (CI-sized): the mmcv ops tests and
    # the fake-CUDA tests, which is what can run there.
    selection = ['tests/test_mmcv_ops.py', 'tests/test_device.py']
    keyword = 'cuda or mmcv or backend or follow' if device == 'cuda' else 'fake_cuda or mmcv_ops or backend'
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *selection, '-k', keyword]
    code, log = _run(cmd, timeout=900 if device == 'cuda' else 600)
    last = [line for line in log.strip().splitlines() if line.strip()][-1:] or ['(no output)']
    if code != 0:
        raise RuntimeError(f'tests failed (exit {code}): {last[0]}\n{log[-2500:]}')
    return {'exit': code, 'summary': last[0]}


def step_speed(device: str, quick: bool, work: Path, image: Path) -> dict:
    if not image.exists():
        return {'skipped': f'no real COCO image at {image} (--image, or MMDET_LRPQ_SHARED_DATA)'}
    out = work / 'speed.json'
    repeats = ['--repeats', '1', '--calib-repeats', '1'] if quick else ['--repeats', '5', '--calib-repeats', '3']
    # A CPU takes seconds per 1333x800 forward: its smoke run uses a small input (the figures are then
    # not the GPU's targets' figures, and the summary says so).
    scale = ['--scale', '448', '256'] if device == 'cpu' else []
    code, log = _run(
        [
            sys.executable,
            'bench/calibration_speed.py',
            '--image',
            str(image),
            '--device',
            device,
            '--out',
            str(out),
            *repeats,
            *scale,
        ],
        timeout=600,
    )
    if code != 0 or not out.exists():
        raise RuntimeError(f'calibration_speed failed (exit {code}):\n{log[-1500:]}')
    data = json.load(open(out))
    keys = (
        'calib_over_fp',
        'quant_over_fp',
        'float_forward_s',
        'quantized_forward_s',
        'calibration_forward_s',
        'wrap_calib_reparam_over_fp',
        'input_hw',
    )
    found = {k: data[k] for k in keys if k in data}
    return found or {'raw': {k: v for k, v in data.items() if not isinstance(v, (list, dict))}}


def step_reconstruct(device: str, quick: bool) -> dict:
    """Seconds per Adam step of block reconstruction, on a timm Swin-T at 224 (random weights)."""
    import timm
    import torch

    from mmdet_lrpq import QuantConfig, quantize_

    torch.manual_seed(0)
    dev = torch.device(device)
    images = [torch.randn(1, 3, 224, 224, device=dev) for _ in range(2)]
    iters = 2 if dev.type == 'cpu' else 4 if quick else 20

    # Swin-T on a GPU; on a CPU one block per stage (the same block shapes, a quarter of the blocks).
    depths = dict(depths=(1, 1, 1, 1)) if dev.type == 'cpu' else {}

    def make():
        return (
            timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, num_classes=10, **depths).to(dev).eval()
        )

    def run(reconstruct) -> float:
        model = make()
        start = time.perf_counter()
        quantize_(model, QuantConfig(w_bits=4, a_bits=4, reconstruct=reconstruct), images)
        if dev.type == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter() - start

    plain = run(None)
    rec = run(dict(iters=iters, batch_size=1, num_images=2))
    stages = make().layers
    units = (
        1
        + sum(len(stage.blocks) for stage in stages)
        + sum(not isinstance(stage.downsample, torch.nn.Identity) for stage in stages)
    )  # patch embed, blocks, mergings
    return {
        'model': 'swin_tiny' + (' (1 block per stage)' if depths else ''),
        'units': units,
        'calibration_s': round(plain, 2),
        'with_reconstruction_s': round(rec, 2),
        'iters_per_unit': iters,
        'seconds_per_step_per_unit': round((rec - plain) / (units * iters), 4),
    }


def summary_lines(record: dict, device: str) -> list[str]:
    lines = []
    for name, step in record['steps'].items():
        status = 'ok' if step.get('ok') else f'FAILED: {step.get("error", "").splitlines()[0][:200]}'
        lines.append(f'{name:>12}: {status} ({step.get("seconds", 0):.0f}s)')
    sc = record['steps'].get('selfcheck', {}).get('result') or {}
    for dev, r in (sc.get('results') or {}).items():
        if r.get('ok'):
            lines.append(
                f'{"AP " + dev:>12}: box {r.get("box_ap"):.1f} mask {r.get("mask_ap"):.1f} '
                f'(float {r.get("float_box_ap", float("nan")):.1f})'
            )
    checks = []
    if 'ap_diff' in sc:
        checks.append(('|AP cuda - AP cpu|', sc['ap_diff'], TARGETS['ap_diff']))
    speed = record['steps'].get('speed', {}).get('result') or {}
    for key in ('calib_over_fp', 'quant_over_fp'):
        if key in speed:
            checks.append((key.replace('_over_', '/'), speed[key], TARGETS[key]))
    for what, value, target in checks:
        verdict = 'meets' if value <= target else 'MISSES'
        lines.append(
            f'{what:>12}: {value:.3f} ({verdict} the GPU target <= {target}'
            f'{"" if device == "cuda" else "; targets are for GPUs"})'
        )
    rec = record['steps'].get('reconstruct', {}).get('result') or {}
    if rec:
        lines.append(f'{"recon step":>12}: {rec["seconds_per_step_per_unit"] * 1000:.1f} ms per Adam step per unit')
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', choices=['cuda', 'cpu'], default='cuda')
    parser.add_argument('--quick', action='store_true', help='fewest repeats (CI-sized; default with --device cpu)')
    parser.add_argument(
        '--steps', default='stack,selfcheck,tests,speed,reconstruct', help='comma-separated subset of the steps'
    )
    parser.add_argument('--image', type=Path, default=COCO_IMAGE, help='the COCO image of the speed step')
    parser.add_argument('--json', default=str(REPO / 'work_dirs' / 'device_check' / 'device_check.json'))
    args = parser.parse_args(argv)
    quick = args.quick or args.device == 'cpu'
    steps = [s.strip() for s in args.steps.split(',') if s.strip()]
    unknown = sorted(set(steps) - {'stack', 'selfcheck', 'tests', 'speed', 'reconstruct'})
    if unknown:
        parser.error(f'--steps: unknown {unknown}')
    record: dict = {'device': args.device, 'quick': quick, 'steps': {}, 'targets': TARGETS}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='mmdet_lrpq_device_check_') as tmp:
        work = Path(tmp)
        runners = {
            'stack': lambda: step_stack(args.device),
            'selfcheck': lambda: step_selfcheck(args.device, quick, work),
            'tests': lambda: step_tests(args.device, quick),
            'speed': lambda: step_speed(args.device, quick, work, args.image),
            'reconstruct': lambda: step_reconstruct(args.device, quick),
        }
        for name in steps:
            t0 = time.perf_counter()
            print(f'[device_check] {name} ...', flush=True)
            try:
                record['steps'][name] = {'ok': True, 'result': runners[name]()}
            except Exception as err:
                record['steps'][name] = {'ok': False, 'error': f'{type(err).__name__}: {err}'}
            record['steps'][name]['seconds'] = round(time.perf_counter() - t0, 1)
    record['seconds'] = round(time.perf_counter() - start, 1)
    record['ok'] = all(s['ok'] for s in record['steps'].values())
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, 'w') as f:
        json.dump(record, f, indent=1, default=str)
    print(f'\ndevice check on {args.device} ({"quick" if quick else "full"}), {record["seconds"]:.0f}s:')
    print('\n'.join(summary_lines(record, args.device)))
    print(f'{"verdict":>12}: {"passed" if record["ok"] else "FAILED"}; details in {args.json}')
    return 0 if record['ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
