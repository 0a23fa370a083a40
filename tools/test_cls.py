"""Top-1 of a timm Swin classifier in float and quantized: check a bit plan on the model it was made on.

    python tools/test_cls.py --model swin_tiny_patch4_window7_224 --checkpoint swin_tiny.pth \\
        --images /data/imagenet/val --plan configs/plans/swin_t_mp4.json --num-calib 32

The classifier is built as tools/lrp_plan.py builds it (a timm name, a kwargs file, or a
checkpoint recording its kwargs). It is evaluated in float, quantized with
``mmdet_lrpq.quantize_`` — the plan (``--plan``, whose mmdet backbone names map onto timm's), or
uniform ``--w-bits/--a-bits``; every Conv2d/Linear and both attention matmuls, post-LayerNorm
inputs reparameterized (``--method``) — calibrated on the first ``--num-calib`` images of
``--calib-images`` (default: ``--images``, whose calibration images are then not evaluated),
streamed ``--calib-batch-size`` at a time (``--calib-batch-size`` equal to ``--num-calib`` is
RepQ-ViT's ImageNet protocol: one batch of 32), and evaluated again.

Labels: class folders with a ``wnids.txt`` (ImageNet layout), or ``--labels FILE`` with
``<path relative to --images> <class index>`` per line (the miniature world's layout).
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import sys
import time

import torch

from mmdet_lrpq.cli import add_classifier_args, build_classifier, labelled_items, resolve_device


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split('\n', 2)[2],
    )
    add_classifier_args(p, 'seeded random weights (top-1 is then chance)')
    p.add_argument('--images', required=True, help='evaluation images: class folders (+ wnids.txt) or a flat folder')
    p.add_argument('--labels', help="'<relative path> <label>' per line, for a flat folder")
    p.add_argument('--num-images', type=int, default=None, help='evaluate only the first N images (stable order)')
    p.add_argument('--calib-images', help='calibration images (default: --images; those used are not evaluated)')
    p.add_argument('--num-calib', type=int, default=32, help='calibration images (default 32)')
    p.add_argument('--calib-batch-size', type=int, default=1, help='calibration images per forward (default 1)')
    q = p.add_mutually_exclusive_group()
    q.add_argument('--plan', help='bit plan JSON (e.g. from tools/lrp_plan.py)')
    q.add_argument('--bits', type=int, help='uniform W=A bits instead of a plan (default 4)')
    p.add_argument('--method', default='crl', choices=['repq', 'crl', 'none'])
    p.add_argument('--crl-k', type=float, default=3.0)
    p.add_argument('--smooth', choices=['sq-b'], help="MPTQ-ViT's SQ-b (QuantConfig.smooth)")
    p.add_argument('--smooth-alpha', type=float, default=0.5, help='SQ-b migration strength (default 0.5)')
    p.add_argument('--gelu-scales', choices=['opt-m'], help="MPTQ-ViT's OPT-m (QuantConfig.gelu_scales)")
    p.add_argument('--batch-size', type=int, default=32, help='evaluation batch size')
    p.add_argument('--device', default='cpu')
    p.add_argument('--out', help='write the results as JSON here')
    p.add_argument('--no-progress', action='store_true')
    args = p.parse_args(argv)
    for name in ('num_calib', 'calib_batch_size', 'batch_size'):
        if getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be >= 1')
    return args


@torch.no_grad()
def top1(model, items: list, transform, batch_size: int, device, desc: str, progress: bool) -> float:
    from mmdet_lrpq.lrp import iter_batches

    correct = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=desc, unit='img', leave=False)
    for images, batch in iter_batches(items, transform, batch_size):
        pred = model(images.to(device)).argmax(1).cpu()
        correct += int((pred == torch.tensor([i.label for i in batch])).sum())
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return 100.0 * correct / len(items)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from mmdet_lrpq import QuantConfig, quantize_
    from mmdet_lrpq.lrp import eval_transform, iter_batches, list_images

    device = resolve_device(args.device)
    if args.checkpoint is None and not args.pretrained and args.random_init is None:
        raise ValueError('give the classifier weights: --checkpoint PATH, --pretrained, or --random-init SEED')
    model, weights = build_classifier(args)
    model.to(device).eval()
    transform = eval_transform(model)
    calib_root = args.calib_images or args.images
    calib_items = list_images(calib_root, args.num_calib)
    items = labelled_items(args.images, args.labels)
    if calib_root == args.images:  # never evaluate on the calibration images
        used = {str(i.path) for i in calib_items}
        items = [i for i in items if str(i.path) not in used]
    if args.num_images is not None:
        items = items[: args.num_images]
    if not items:
        raise ValueError(f'no evaluation images left in {args.images} after the {len(calib_items)} calibration images')

    t0 = time.time()
    fp = top1(model, items, transform, args.batch_size, device, 'float', not args.no_progress)
    config = QuantConfig(
        plan=args.plan,
        w_bits=args.bits or 4,
        a_bits=args.bits or 4,
        method=args.method,
        crl_k=args.crl_k,
        smooth=args.smooth,
        smooth_alpha=args.smooth_alpha,
        gelu_scales=args.gelu_scales,
    )
    calib = (images.to(device) for images, _ in iter_batches(calib_items, transform, args.calib_batch_size))
    if args.smooth:  # SQ-b reads the calibration images twice
        calib = list(calib)
    t1 = time.time()
    report = quantize_(model, config, calib=calib)
    t2 = time.time()
    quant = top1(model, items, transform, args.batch_size, device, 'quantized', not args.no_progress)
    totals = report.totals
    result = {
        'model': args.model,
        'weights': weights,
        'plan': args.plan,
        'bits': None if args.plan else (args.bits or 4),
        'method': args.method,
        **{k: getattr(args, k) for k in ('smooth', 'gelu_scales') if getattr(args, k)},
        **({'smooth_alpha': args.smooth_alpha} if args.smooth else {}),
        'num_eval_images': len(items),
        'num_calib_images': len(calib_items),
        'calib_batch_size': args.calib_batch_size,
        'top1_float': fp,
        'top1_quantized': quant,
        'avg_weight_bits': totals['avg_weight_bits'],
        'avg_act_bits': totals['avg_act_bits'],
        'weight_mb': totals['weight_mb'],
        'calibration_seconds': round(t2 - t1, 2),
        **({'smoothing_seconds': report.calibration['smoothing']['seconds']} if args.smooth else {}),
        'seconds': round(time.time() - t0, 1),
        'command': 'python tools/test_cls.py ' + ' '.join(argv or sys.argv[1:]),
    }
    print(report.table().splitlines()[-1])
    print(
        f'top-1 on {len(items)} images: float {fp:.2f}%, quantized {quant:.2f}% ({quant - fp:+.2f}); '
        f'calibration {result["calibration_seconds"]:.1f}s on {len(calib_items)} image(s)'
    )
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, ValueError, TypeError) as err:
        if os.environ.get('MMDET_LRPQ_TRACEBACK'):
            raise
        sys.exit(f'error ({type(err).__name__}): {err}\n(set MMDET_LRPQ_TRACEBACK=1 for the traceback)')
