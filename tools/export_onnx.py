"""Export a quantized detector's backbone + neck to ONNX (QDQ, integer weights) and check it in ONNX Runtime.

    python tools/export_onnx.py configs/miniworld/mask_rcnn_swin_mini_quant.py \\
        checkpoints/miniworld/mask_rcnn_swin_mini.pth --out work_dirs/onnx --cfg-options custom_hooks.0.round_zero_point=True
    python tools/export_onnx.py CONFIG CKPT --state STATE.pth --out DIR          # a calibrated state, no calibration
    python tools/export_onnx.py configs/mask_rcnn_swin_t_w4a4.py --random-weights --image IMG.jpg --out DIR

The detector is quantized as its config's ``QuantizationHook`` says (fresh calibration, or ``--state``:
a state saved by the hook's ``state_file`` / ``quantize_(state_file=)``, refused if it was made from
other weights, options or calibration). The exported graph computes backbone + neck on the
preprocessed image (fixed input shape: the example image's); RPN, RoI heads, RoIAlign and NMS stay
in PyTorch. Prints what ONNX Runtime runs in integer kernels and what stays float, and the parity
of ONNX Runtime against the PyTorch quantized model on the example image (every quantizer's codes,
and the feature maps); writes ``backbone_neck.onnx`` and ``export_report.json`` to ``--out``.

The parity check fails the export (exit status 3, after writing both files, the sites named) where
the graph does not compute what the model computes: a quantizer whose codes differ from the model's
own quantizer *on the same input* by more than one step, or a quantizer whose input differs by more
than one step while every earlier quantizer's codes agree (``mmdet_lrpq.export.runtime.disagreements``).
Codes that differ end to end after a first one-step rounding flip are reported, not failed: the
flips propagate in a correct graph too.
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('config')
    p.add_argument('checkpoint', nargs='?', help='detector checkpoint (or --random-weights)')
    p.add_argument('--out', required=True, help='output directory')
    p.add_argument('--state', help='calibrated state file to load instead of calibrating (must exist)')
    p.add_argument(
        '--random-weights',
        action='store_true',
        help='no checkpoint: seeded random weights, calibrated on --image (speed/size studies only)',
    )
    p.add_argument(
        '--image',
        help='example (and, with --random-weights, calibration) image; default: the first test image of the config',
    )
    p.add_argument('--data-root', help='dataset root (moves the test set and its annotation file together)')
    p.add_argument('--opset', type=int, default=21, help='ONNX opset, 17..21 (4-bit weights need 21)')
    p.add_argument(
        '--fractional-zero-point',
        choices=('exact', 'round', 'error'),
        default='exact',
        help='sites whose zero point is fractional (RepQ without round_zero_point): exact float ops '
        '(default), QDQ with the rounded zero point, or refuse',
    )
    p.add_argument('--int4-activations', action='store_true', help='carry <=4-bit activations in uint4 (no Clip)')
    p.add_argument('--threads', type=int, default=None, help='ONNX Runtime / torch threads')
    p.add_argument(
        '--no-code-parity',
        action='store_true',
        help='skip the per-quantizer code comparison (it keeps every activation in memory)',
    )
    p.add_argument('--cfg-options', nargs='+', default=[], help='config overrides key=value')
    return p.parse_args(argv)


def _options(pairs: list[str]) -> dict:
    from mmengine.config import DictAction

    action = DictAction(option_strings=[], dest='x')
    ns = argparse.Namespace()
    action(None, ns, pairs)
    return ns.x


def first_test_image(cfg) -> str:
    ds = cfg.test_dataloader.dataset
    with open(osp.join(ds.data_root, ds.ann_file)) as f:
        first = json.load(f)['images'][0]['file_name']
    return osp.join(ds.data_root, ds.data_prefix.get('img', ''), first)


def build_quantized(args, cfg):
    """The quantized detector on the CPU, from a checkpoint (the hook's path) or random weights."""
    import torch

    if args.state and not osp.isfile(args.state):
        sys.exit(
            f'error: --state {args.state} not found (save one with the hook option state_file=..., or leave '
            f'--state out to calibrate)'
        )
    if args.random_weights:
        from mmdet.registry import MODELS

        import mmdet_lrpq
        from mmdet_lrpq.apis import _hook_options
        from mmdet_lrpq.export.detector import batch_from_image

        options = _hook_options(cfg)
        if options is None:
            sys.exit(f'error: {args.config} has no QuantizationHook: nothing says how to quantize')
        options.pop('calib', None)
        for key in ('report_file', 'state_file', 'state_mismatch'):
            options.pop(key, None)
        torch.manual_seed(0)
        model = MODELS.build(cfg.model).eval()
        model.cfg = cfg
        mmdet_lrpq.quantize_(
            model,
            calib=[batch_from_image(cfg, args.image)],
            state_file=args.state,
            calib_id={'image': osp.basename(args.image), 'weights': 'random, seed 0'},
            **options,
        )
        return model
    if not args.checkpoint:
        sys.exit('error: give a checkpoint, or --random-weights')
    from mmdet_lrpq.apis import init_quantized_detector

    if args.state:
        cfg.custom_hooks[0]['state_file'] = osp.abspath(args.state)
    return init_quantized_detector(cfg, args.checkpoint, device='cpu', progress=False)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from mmengine.config import Config

    from mmdet_lrpq import register_all_modules
    from mmdet_lrpq.export import census, code_parity, export_onnx, output_parity, run, session
    from mmdet_lrpq.export.detector import BackboneNeck, batch_from_image, by_kind, preprocessed_input

    register_all_modules()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(_options(args.cfg_options))
    if args.data_root:
        from mmdet_lrpq.cli import set_data_root

        set_data_root(cfg, args.data_root)
    if args.image is None:
        try:
            args.image = first_test_image(cfg)
        except (OSError, KeyError, IndexError) as err:
            sys.exit(f"error: no --image and the config's test set cannot be read ({err}); pass --image or --data-root")
    t0 = time.perf_counter()
    model = build_quantized(args, cfg)
    t_quant = time.perf_counter() - t0
    part = BackboneNeck(model)
    x = preprocessed_input(model, batch_from_image(cfg, args.image))
    os.makedirs(args.out, exist_ok=True)
    path = osp.join(args.out, 'backbone_neck.onnx')
    t0 = time.perf_counter()
    result = export_onnx(
        part,
        path,
        x,
        opset=args.opset,
        fractional_zero_point=args.fractional_zero_point,
        int4_activations=args.int4_activations,
    )
    t_export = time.perf_counter() - t0
    summary = result.summary()
    outputs = run(session(path, args.threads), result.example_input)
    parity = output_parity(result.torch_outputs, outputs, result.output_names)
    codes = None if args.no_code_parity else code_parity(result, part)
    ops = census(path, args.threads)
    report = {
        'config': args.config,
        'checkpoint': args.checkpoint or 'random weights (seed 0)',
        'state': args.state,
        'image': args.image,
        'input_shape': list(x.shape),
        'quantize_seconds': round(t_quant, 1),
        'export_seconds': round(t_export, 1),
        'export': summary,
        'onnxruntime': {
            'integer_kernels': ops['integer_kernels'],
            'integer_by_kind': by_kind(ops['integer_nodes']),
            'dequantized_products': ops['dequantized_products'],
            'dequantized_by_kind': by_kind(ops['dequantized_nodes']),
            'op_counts': ops['op_counts'],
        },
        'parity': {
            'outputs': parity,
            'codes': None if codes is None else {k: v for k, v in codes.items() if k != 'sites'},
            'worst_sites': None if codes is None else sorted(codes['sites'], key=lambda r: -r['frac_differing'])[:5],
        },
    }
    with open(osp.join(args.out, 'export_report.json'), 'w') as f:
        json.dump(report, f, indent=1)
    print_report(report)
    if codes is not None and codes['disagreements']:
        print(
            f'error: the exported graph does not compute what the PyTorch model computes at '
            f'{len(codes["disagreements"])} site(s):',
            file=sys.stderr,
        )
        for line in codes['disagreements']:
            print(f'  {line}', file=sys.stderr)
        print(
            f"  (files kept in {args.out} for inspection; export_report.json has every site's figures)", file=sys.stderr
        )
        sys.exit(3)
    return report


def print_report(r: dict) -> None:
    e, o, p = r['export'], r['onnxruntime'], r['parity']
    w, a = e['weights'], e['activations']
    print(
        f'wrote {e["file"]} ({e["file_mb"]:.2f} MB, opset {e["opset"]}, input {r["input_shape"]}): backbone + neck; '
        f'RPN, RoI heads, RoIAlign and NMS stay in PyTorch'
    )
    print(
        f'stored as integers: {w["count"]} weights ({", ".join(f"{n} {c}" for c, n in w["carriers"].items())}; '
        f'bits {w["bits"]}), per output channel scale and zero point'
    )
    print(
        f'activation quantizers: {a["qdq"]} of {a["count"]} as QuantizeLinear/DequantizeLinear '
        f'({", ".join(f"{n} {c}" for c, n in a["carriers"].items())}); '
        f'{e["log_sqrt2"]["count"]} log-sqrt2 (attention) exact in standard float ops'
    )
    if a['float_sites']:
        print(
            f'  {len(a["float_sites"])} sites have a fractional zero point and run as exact float fake-quant '
            f'(quantize with round_zero_point=True for their integer form), e.g. {a["float_sites"][0]}'
        )
    if a['rounded_zero_point_sites']:
        print(f'  {len(a["rounded_zero_point_sites"])} fractional zero points ROUNDED: not the evaluated model')
    print(
        f'ONNX Runtime runs {o["integer_kernels"]} products in integer kernels {o["integer_by_kind"]}; '
        f'{o["dequantized_products"]} on dequantized (float) inputs {o["dequantized_by_kind"]}'
    )
    print(f'stays float: {e["float_ops"]}')
    worst = max(p['outputs'], key=lambda row: row['max_rel_diff'])
    print(
        f'parity (ONNX Runtime vs PyTorch quantized, this image): features max |diff| {worst["max_abs_diff"]:.3g} '
        f'({worst["max_rel_diff"]:.2%} of the largest value, {worst["output"]}); elements beyond 1e-4 of it: '
        f'{max(row["frac_beyond_1e-4"] for row in p["outputs"]):.2%}'
    )
    if p['codes'] is not None:
        c = p['codes']
        print(
            f'  quantizer codes, each runtime on its own input: {c["differing"]} of {c["elements"]} differ '
            f'({c["frac_differing"]:.2e}) over {c["sites_compared"]} quantizers, by at most {c["max_steps"]:g} '
            f'step(s) (rounding flips that propagate)'
        )
        print(
            f"  quantizer codes on the same input (ONNX Runtime's, fed to the model's quantizer): "
            f'{c["same_input_differing"]} differ, by at most {c["same_input_max_steps"]:g} step(s)'
        )
        if not c['disagreements']:
            print(
                "  parity check passed: every quantizer computes the model's codes on the same input, and no input "
                'differs by more than a step before the first rounding flip'
            )
    else:
        print(
            '  parity check skipped (--no-code-parity): the graph is not checked against the model quantizer by '
            'quantizer'
        )


if __name__ == '__main__':
    main()
