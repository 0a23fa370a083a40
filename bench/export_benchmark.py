"""The exported integer model measured: file sizes, ONNX Runtime latency, and detector AP with ONNX Runtime.

    .venv/bin/python bench/export_benchmark.py                 # both parts
    .venv/bin/python bench/export_benchmark.py --part speed    # Swin-T sizes and latencies only
    .venv/bin/python bench/export_benchmark.py --part ap       # miniature-world AP only
    .venv/bin/python bench/export_benchmark.py --tables-only   # rewrite the tables from the JSON

**speed** — mmdet's Mask R-CNN Swin-T backbone + FPN at the test resolution (one COCO image resized to
1333x800, padded), random weights (sizes and timings do not depend on them; no pretrained weights exist
here), quantized through the hook's driver (CRL, ``round_zero_point=True`` so that every activation
quantizer has an integer form) at W8A8, W4A4 and the shipped MP4 plan (a placeholder plan from random
weights: right structure and budget). File size of the float export vs each quantized export; latency of
ONNX Runtime float vs ONNX Runtime W8A8 vs our PyTorch fake-quant W8A8 vs PyTorch float, one process,
same thread count, interleaved (each round runs every model once, in rotating order; the median over
rounds). ONNX Runtime's graph after optimization is read back to say which products ran in integer
kernels and which on dequantized inputs, and a profile gives the share of node time in the exact
log-sqrt2 attention quantizer.

**ap** — the miniature world's Mask R-CNN at W8A8, W4A4 and MP4 (its LRP plan), calibrated as the
miniature-world config says (CRL, ``round_zero_point=True``): box/mask AP on the whole val split with
PyTorch computing everything vs with ONNX Runtime computing backbone + FPN (heads in PyTorch), and the
rounding floor: PyTorch with every float op of backbone + FPN moved by up to one ulp (one run per
seed; ``rounding_noise``), all on the same batches in one loop. Every quantizer's codes, ONNX Runtime
vs PyTorch on a few val images, each runtime on its own input and on the same input (``code_parity``),
with the parity check's verdict (``disagreements``).

Writes ``results/export_benchmark.json`` and the tables in ``docs/export.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import platform
import statistics
import sys
import tempfile
import time

import torch

try:
    from bench import common
except ImportError:  # python bench/export_benchmark.py: bench/ is sys.path[0]
    import common

REPO = common.REPO

DEFAULT_IMAGE = osp.join(REPO, '..', 'shared', 'data', 'coco_mini', 'val2017', '000000397133.jpg')
RESULTS = osp.join(REPO, 'results', 'export_benchmark.json')
DOC = osp.join('docs', 'export.md')
MARKERS = ('<!-- export_benchmark:begin -->', '<!-- export_benchmark:end -->')
COMMAND = 'python bench/export_benchmark.py'
SETTINGS = {
    'W8A8': dict(w_bits=8, a_bits=8),
    'W4A4': dict(w_bits=4, a_bits=4),
    'MP4': dict(plan=osp.join(REPO, 'configs', 'plans', 'swin_t_mp4.json')),
}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def speed_part(args) -> dict:
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    import mmdet_lrpq
    from mmdet_lrpq.export import census, export_onnx, profile_log_sqrt2, run, session
    from mmdet_lrpq.export.detector import BackboneNeck, batch_from_image, by_kind, preprocessed_input

    register_all_modules()
    mmdet_lrpq.register_all_modules()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'mask_rcnn_swin_t_w4a4.py'))
    batch = batch_from_image(cfg, args.image)

    def build():
        torch.manual_seed(0)
        model = MODELS.build(cfg.model).eval()
        with torch.no_grad():
            model.roi_head.bbox_head.fc_cls.bias[0] += (
                6.0  # detections, so the RoI heads calibrate (as bench/calibration_speed.py)
            )
        return model

    tmp = tempfile.mkdtemp(prefix='export_bench_')
    model_fp = build()
    x = preprocessed_input(model_fp, batch)
    float_part = BackboneNeck(model_fp).eval()
    float_path = osp.join(tmp, 'float.onnx')
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(float_part, (x,), float_path, dynamo=False, opset_version=20, input_names=['input'])
    rows = {'float': {'file_mb': osp.getsize(float_path) / 2**20}}
    quantized = {}
    for name, options in SETTINGS.items():
        model = build()
        t = timed(
            lambda model=model, options=options: mmdet_lrpq.quantize_(
                model, mmdet_lrpq.QuantConfig(method='crl', round_zero_point=True, **options), calib=[batch]
            )
        )
        part = BackboneNeck(model).eval()
        path = osp.join(tmp, f'{name}.onnx')
        t_export = timed(
            lambda name=name, part=part, path=path: quantized.__setitem__(name, (export_onnx(part, path, x), part))
        )
        s = quantized[name][0].summary()
        rows[name] = {
            'file_mb': osp.getsize(path) / 2**20,
            'calibrate_s': t,
            'export_s': t_export,
            'weight_carriers': s['weights']['carriers'],
            'activation_carriers': s['activations']['carriers'],
        }
        print(
            f'{name}: calibrated in {t:.0f} s, exported in {t_export:.0f} s, {rows[name]["file_mb"]:.1f} MB', flush=True
        )
    for name in rows:
        rows[name]['size_vs_float'] = rows[name]['file_mb'] / rows['float']['file_mb']

    # latency, interleaved: ONNX Runtime float / W8A8, PyTorch float / fake-quant W8A8
    r8, part8 = quantized['W8A8']
    xs = x.numpy()
    ort_float, ort_w8a8 = session(float_path, args.threads), session(r8.path, args.threads)
    runners = {
        'onnxruntime float': (lambda: run(ort_float, xs)),
        'onnxruntime W8A8': (lambda: run(ort_w8a8, xs)),
        'pytorch float': (lambda: float_part(x)),
        'pytorch fake-quant W8A8': (lambda: part8(x)),
    }
    for fn in runners.values():
        fn()  # warm-up
    times = {k: [] for k in runners}
    names = list(runners)
    for i in range(args.rounds):
        for k in names[i % len(names) :] + names[: i % len(names)]:
            times[k].append(timed(runners[k]))
        print(f'round {i + 1}/{args.rounds}: ' + ', '.join(f'{k} {times[k][-1]:.2f}s' for k in names), flush=True)
    latency = {k: statistics.median(v) for k, v in times.items()}
    ops = census(r8.path, args.threads)
    prof = profile_log_sqrt2(r8.path, xs, args.threads, runs=1)
    sizes_4 = {}
    for name in ('W4A4', 'MP4'):
        o = census(quantized[name][0].path, args.threads)
        sizes_4[name] = {'integer_kernels': o['integer_kernels'], 'dequantized_products': o['dequantized_products']}
    return {
        'input_shape': list(x.shape),
        'threads': args.threads,
        'rounds': args.rounds,
        'image': osp.basename(args.image),
        'files': rows,
        'latency_s': latency,
        'latency_all_s': times,
        'speedup_ort_w8a8_vs_ort_float': latency['onnxruntime float'] / latency['onnxruntime W8A8'],
        'w8a8_census': {
            'integer_kernels': ops['integer_kernels'],
            'dequantized_products': ops['dequantized_products'],
            'integer_by_kind': by_kind(ops['integer_nodes']),
            'dequantized_by_kind': by_kind(ops['dequantized_nodes']),
        },
        'census_4bit': sizes_4,
        'log_sqrt2_profile_w8a8': prof,
    }


def ap_part(args) -> dict:
    from mmdet_lrpq.apis import init_quantized_detector
    from mmdet_lrpq.export import code_parity, export_onnx, session
    from mmdet_lrpq.export.detector import (
        BackboneNeck,
        batch_from_image,
        evaluate_ap,
        preprocessed_input,
        rounding_noise,
    )
    from mmdet_lrpq.miniworld import experiments as ex

    ex.require_checkpoints(('mask_rcnn',))
    ex.ensure_data()
    torch.set_num_threads(args.threads)
    _, quant_cfg, ckpt = ex.DETECTORS['mask_rcnn']
    tmp = tempfile.mkdtemp(prefix='export_ap_')
    plan = ex.make_plan(4, tmp)
    rows = []
    for name, options in {
        'W8A8': dict(w_bits=8, a_bits=8),
        'W4A4': dict(w_bits=4, a_bits=4),
        'MP4': dict(plan=plan),
    }.items():
        opts = {f'custom_hooks.0.{k}': v for k, v in dict(options, round_zero_point=True).items()}
        model = init_quantized_detector(
            osp.join(REPO, quant_cfg),
            ckpt,
            device='cpu',
            progress=False,
            cfg_options={'data_root': ex.DATA + '/', **opts},
        )
        part = BackboneNeck(model)
        x = preprocessed_input(model, batch_from_image(model.cfg, osp.join(ex.DATA, 'val', '000001.jpg')))
        r = export_onnx(part, osp.join(tmp, f'{name}.onnx'), x)
        codes = [
            code_parity(
                r,
                part,
                preprocessed_input(model, batch_from_image(model.cfg, osp.join(ex.DATA, 'val', f'{i:06d}.jpg'))),
            )
            for i in range(1, args.parity_images + 1)
        ]
        t0 = time.perf_counter()
        noise = {f'noise{s}': (lambda s=s, part=part: rounding_noise(part, s)) for s in range(args.noise_seeds)}
        ap = evaluate_ap(
            model, model.cfg, session(r.path, args.threads), data_root=ex.DATA + '/', limit=args.limit, variants=noise
        )
        row = {
            'setting': name,
            'images': ap['images'],
            'seconds': time.perf_counter() - t0,
            'box_ap_torch': ap['torch']['coco/bbox_mAP'],
            'box_ap_onnx': ap['onnx']['coco/bbox_mAP'],
            'mask_ap_torch': ap['torch']['coco/segm_mAP'],
            'mask_ap_onnx': ap['onnx']['coco/segm_mAP'],
            'box_ap_noise': [ap[k]['coco/bbox_mAP'] for k in noise],
            'mask_ap_noise': [ap[k]['coco/segm_mAP'] for k in noise],
            'parity_images': len(codes),
            'codes_frac_differing': statistics.mean(c['frac_differing'] for c in codes),
            'codes_max_steps': max(c['max_steps'] for c in codes),
            'same_input_differing': sum(c['same_input_differing'] for c in codes),
            'same_input_elements': sum(c['elements'] for c in codes),
            'disagreements': sorted({d for c in codes for d in c['disagreements']}),
            'file_mb': r.file_bytes / 2**20,
        }
        rows.append(row)
        print(rows[-1], flush=True)
    return {'detector': 'mask_rcnn (miniature world)', 'noise_seeds': args.noise_seeds, 'rows': rows}


def _spread(torch_ap: float, noisy: list) -> str:
    """The largest AP difference PyTorch itself shows under rounding noise, with the range."""
    worst = max(abs(v - torch_ap) for v in noisy)
    return f'{worst:.1f} ({min(noisy):.1f}-{max(noisy):.1f})'


def tables(results: dict) -> str:
    out = []
    env = results['environment']
    if 'speed' in results:
        s = results['speed']
        f = s['files']
        out += [
            f'**Swin-T Mask R-CNN backbone + FPN, input {s["input_shape"][2]}x{s["input_shape"][3]}, random weights, '
            f'{s["threads"]} threads, {env["cpu"]}** (`{results["commands"]["speed"]}`, median of {s["rounds"]} '
            f'interleaved rounds)',
            '',
            '| model | file MB | vs float | weights stored |',
            '|---|---|---|---|',
        ]
        for name, row in f.items():
            carriers = ', '.join(f'{n} {c}' for c, n in row.get('weight_carriers', {}).items()) or 'float32'
            out.append(f'| {name} | {row["file_mb"]:.1f} | {row["size_vs_float"]:.3f}x | {carriers} |')
        lat = s['latency_s']
        out += ['', '| runtime | latency s | vs ONNX Runtime float |', '|---|---|---|']
        for k, v in lat.items():
            out.append(f'| {k} | {v:.2f} | {lat["onnxruntime float"] / v:.2f}x |')
        c = s['w8a8_census']
        p = s['log_sqrt2_profile_w8a8']
        out += [
            '',
            f'W8A8 in ONNX Runtime: {c["integer_kernels"]} products in integer kernels '
            f'({", ".join(f"{k} {n}" for k, n in c["integer_by_kind"].items())}), '
            f'{c["dequantized_products"]} on dequantized inputs '
            f'({", ".join(f"{k} {n}" for k, n in c["dequantized_by_kind"].items())}); '
            f'the exact log-sqrt2 attention quantizer takes {p["log_sqrt2_share"]:.1%} of node time. '
            f'W4A4 / MP4: '
            + '; '.join(
                f'{k} {v["integer_kernels"]} integer, {v["dequantized_products"]} dequantized'
                for k, v in s['census_4bit'].items()
            )
            + '.',
        ]
    if 'ap' in results:
        a = results['ap']
        r0 = a['rows'][0]
        out += [
            '',
            f'**Miniature-world Mask R-CNN, box / mask AP on the first {r0["images"]} val images** '
            f'(`{results["commands"]["ap"]}`): PyTorch quantized; ONNX Runtime computing backbone + FPN (heads '
            f"in PyTorch); |ONNX Runtime - PyTorch|; and the rounding floor: the largest |AP - PyTorch's| of "
            f'PyTorch itself with every float op of backbone + FPN moved by up to one ulp '
            f'(`rounding_noise`, seeds 0-{a["noise_seeds"] - 1}; the range in brackets). Codes, on val images '
            f'1-{r0["parity_images"]}: the fraction of all quantizer codes that differ with each runtime on '
            f'its own input (rounding flips that propagate) and the largest such difference; on the same '
            f"input (ONNX Runtime's, fed to the model's own quantizer): codes that differ.",
            '',
            '| setting | box PyTorch | box ONNX Runtime | box diff | box rounding floor | mask PyTorch | '
            'mask ONNX Runtime | mask diff | mask rounding floor | codes differing | max steps | '
            'same input: differing |',
            '|---|---|---|---|---|---|---|---|---|---|---|---|',
        ]
        for r in a['rows']:
            out.append(
                f'| {r["setting"]} | {r["box_ap_torch"]:.1f} | {r["box_ap_onnx"]:.1f} | '
                f'{abs(r["box_ap_onnx"] - r["box_ap_torch"]):.1f} | {_spread(r["box_ap_torch"], r["box_ap_noise"])} | '
                f'{r["mask_ap_torch"]:.1f} | {r["mask_ap_onnx"]:.1f} | '
                f'{abs(r["mask_ap_onnx"] - r["mask_ap_torch"]):.1f} | '
                f'{_spread(r["mask_ap_torch"], r["mask_ap_noise"])} | {r["codes_frac_differing"]:.1e} | '
                f'{r["codes_max_steps"]:g} | {r["same_input_differing"]} of {r["same_input_elements"]} |'
            )
        bad = [d for r in a['rows'] for d in r['disagreements']]
        out += [
            '',
            'Parity check (`disagreements`): '
            + ('; '.join(bad) if bad else 'no site where the graph is not the model, in any setting.'),
        ]
    return '\n'.join(out) + '\n'


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--part', choices=('speed', 'ap', 'all'), default='all')
    p.add_argument('--image', default=DEFAULT_IMAGE)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--limit', type=int, default=None, help='ap: first N val images (default: all 200)')
    p.add_argument(
        '--noise-seeds',
        type=int,
        default=5,
        help='ap: PyTorch runs under one-ulp rounding noise (the rounding floor), one per seed',
    )
    p.add_argument('--parity-images', type=int, default=4, help='ap: val images for the per-quantizer code parity')
    p.add_argument('--no-doc', action='store_true')
    p.add_argument(
        '--tables-only',
        action='store_true',
        help=f'run nothing: rewrite the {DOC} block from {osp.relpath(RESULTS, REPO)}',
    )
    args = p.parse_args(argv)
    if args.tables_only:
        results = common.saved_results(RESULTS, COMMAND)
        common.publish(tables(results), osp.join(REPO, DOC), MARKERS, COMMAND, update=not args.no_doc)
        return results
    results = json.load(open(RESULTS)) if osp.isfile(RESULTS) else {}
    import onnxruntime

    results['environment'] = {
        'python': platform.python_version(),
        'torch': torch.__version__,
        'onnxruntime': onnxruntime.__version__,
        'cpus': os.cpu_count(),
        'cpu': common.cpu_name('unknown CPU'),
    }
    results.pop('command', None)
    results.setdefault('commands', {})
    if args.part in ('speed', 'all'):
        results['commands']['speed'] = f'{COMMAND} --part speed --rounds {args.rounds}'
    if args.part in ('ap', 'all'):
        results['commands']['ap'] = (
            f'{COMMAND} --part ap'
            + (f' --limit {args.limit}' if args.limit else '')
            + (f' --noise-seeds {args.noise_seeds}' if args.noise_seeds != 5 else '')
            + (f' --parity-images {args.parity_images}' if args.parity_images != 4 else '')
            + (f' --threads {args.threads}' if args.threads != 2 else '')
        )
    if args.part in ('speed', 'all'):
        if not osp.isfile(args.image):
            sys.exit(f'image not found: {args.image} (pass --image PATH to a COCO image)')
        results['speed'] = speed_part(args)
    if args.part in ('ap', 'all'):
        results['ap'] = ap_part(args)
    common.write_json(RESULTS, results)
    common.publish(tables(results), osp.join(REPO, DOC), MARKERS, COMMAND, update=not args.no_doc)
    return results


if __name__ == '__main__':
    main()
