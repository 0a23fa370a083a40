"""``tools/selfcheck.py``: a user's first check of a machine, run as the user runs it (a subprocess).

On this machine's devices: the stack lines, one result line per device with real numbers, the JSON;
and the failures a new machine meets, each a non-zero exit with its reason and no traceback.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RESULT = re.compile(
    r'^ *(?P<device>cpu|cuda): box AP +(?P<box>[\d.]+) \(float +(?P<float_box>[\d.]+)\) +'
    r'mask AP +(?P<mask>[\d.]+) \(float +(?P<float_mask>[\d.]+)\) +calibration (?P<calib>[\d.]+)s +'
    r'quantized/float forward (?P<ratio>[\d.]+)x +max diff vs cpu: (?P<diff>.+)$',
    re.M,
)
STACK = ('python', 'torch', 'timm', 'mmengine', 'mmcv', 'mmdet', 'lrpq kernels', 'devices')


def selfcheck(*args: str) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'selfcheck.py'), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


def devices() -> list[str]:
    return ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def cuda_ops() -> bool:
    """mmcv's ops run on CUDA: the torchvision backend always does, compiled ops when built with CUDA."""
    from mmdet_lrpq.env import stack_report

    report = stack_report()
    return report['mmcv_ops_backend'] == 'torchvision' or bool(report['mmcv_ops_cuda'])


def assert_clean_failure(rc: int, log: str, reason: str) -> None:
    assert rc == 1, log[-3000:]
    assert re.search(reason, log), log[-3000:]
    assert 'Traceback' not in log, log[-3000:]
    assert 'selfcheck FAILED' in log


def test_quick_check_prints_the_stack_and_a_result_per_device(tmp_path):
    report = tmp_path / 'selfcheck.json'
    rc, log = selfcheck('--quick', '--json', str(report))
    working = [d for d in devices() if d == 'cpu' or cuda_ops()]
    assert rc == (0 if working == devices() else 1), log[-3000:]
    for name in STACK:
        assert re.search(rf'^ *{name}: \S', log, re.M), f'no {name!r} line:\n{log[-3000:]}'
    lines = {m['device']: m for m in RESULT.finditer(log)}
    assert sorted(lines) == sorted(working), log[-3000:]
    for device, m in lines.items():
        assert float(m['float_box']) > 0 and float(m['float_mask']) > 0, m[0]
        assert 0 <= float(m['box']) <= 100 and 0 <= float(m['mask']) <= 100, m[0]
        assert float(m['calib']) > 0 and float(m['ratio']) > 0, m[0]
        if device == 'cpu':
            assert m['diff'] == '-'
        else:
            assert re.match(r'scores [\d.e+-]+, features [\d.e+-]+ \(relative\)', m['diff']), m[0]
    if 'cuda' not in working and 'cuda' in devices():  # a GPU, but mmcv's ops are CPU-only: said so, and why
        assert re.search(r"cuda: FAILED: mmcv's ops were built for the CPU only", log), log[-3000:]
    data = json.loads(report.read_text())
    assert data['ok'] is (rc == 0) and data['stack']['mmdet']
    kernels = data['stack']['fused_kernels']
    state = 'on' if kernels['on'] else 'off'
    assert f'lrpq kernels: fused CPU quantization kernels {state} ({kernels["why"]})' in log
    by_device = {r['device']: r for r in data['results']}
    assert sorted(by_device) == devices()
    for device in working:
        r = by_device[device]
        assert r['ok'] and r['float_box_ap'] > 0 and r['forward_ms']['float'] > 0
        assert round(r['box_ap'], 1) == float(lines[device]['box'])


def test_missing_checkpoint_fails_with_its_path_and_the_fix(tmp_path):
    missing = tmp_path / 'nowhere' / 'mask_rcnn_swin_mini.pth'
    rc, log = selfcheck('--quick', '--device', 'cpu', '--checkpoint', str(missing))
    assert_clean_failure(rc, log, rf"checkpoint not found: '{re.escape(str(missing))}'. Pass the path")


def test_a_failing_device_is_reported_with_its_reason(tmp_path):
    """Unreadable calibration images: calibration fails on the device, after the stack and the data checks."""
    from mmdet_lrpq.miniworld import generate

    generate(tmp_path, sizes=dict(train=0, val=4, calib=8, cls_train=0, cls_val=0))
    for image in (tmp_path / 'calib').glob('*.jpg'):
        image.write_bytes(image.read_bytes()[:200])  # truncated JPEG files
    rc, log = selfcheck('--quick', '--device', 'cpu', '--data', str(tmp_path))
    assert_clean_failure(
        rc,
        log,
        r'cpu: FAILED: CalibrationDataError: calibration image \S+/calib/\d+\.jpg could not be '
        r'loaded .*\(at \S+calib_data\.py:\d+ in _item\)',
    )
    assert 'selfcheck FAILED on cpu: see the reason' in log


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_asking_for_cuda_without_a_gpu_says_so():
    rc, log = selfcheck('--quick', '--device', 'cuda')
    assert_clean_failure(rc, log, r'--device cuda: torch \S+ sees no CUDA device')


def _tool():
    """tools/selfcheck.py as a module (its CUDA-only comparison must be right where no GPU checks it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location('selfcheck_tool', REPO / 'tools' / 'selfcheck.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_difference_from_the_cpu_run_and_its_result_line():
    tool = _tool()
    cpu = {
        'scores': [torch.tensor([0.9, 0.5, 0.2]), torch.tensor([])],
        'features': [torch.tensor([[1.0, -4.0]]), torch.tensor([2.0])],
    }
    assert tool.difference(cpu, cpu) == {'scores': 0.0, 'features': 0.0, 'same_counts': True}
    # another order, one score moved by 0.01, one more detection; features off by 0.1 of 4
    cuda = {
        'scores': [torch.tensor([0.2, 0.91, 0.5, 0.1]), torch.tensor([])],
        'features': [torch.tensor([[1.0, -3.9]]), torch.tensor([2.0])],
    }
    diff = tool.difference(cuda, cpu)
    assert diff['scores'] == pytest.approx(0.01, rel=1e-5) and diff['features'] == pytest.approx(0.025, rel=1e-5)
    assert diff['same_counts'] is False
    result = tool.DeviceResult(
        'cuda',
        ok=True,
        box_ap=50.0,
        mask_ap=40.0,
        float_box_ap=60.0,
        float_mask_ap=50.0,
        calibration_seconds=0.5,
        forward_ratio=1.5,
        diff_vs_cpu=diff,
    )
    m = RESULT.match(result.line())
    assert m and m['device'] == 'cuda' and m['diff'].startswith('scores 1.0e-02, features 2.5e-02 (relative)')
    assert m['diff'].endswith('detection counts differ')
