"""Reproduce the paper's COCO table in one command: our box / mask AP beside the published numbers.

    python tools/reproduce.py --coco-root data/coco --download --imagenet /data/imagenet/val --pretrained
    python tools/reproduce.py --coco-root data/coco --detectors mask_rcnn --backbones swin_t \\
        --checkpoint mask_rcnn_swin_t=mask_rcnn_swin_tiny_patch4_window7.pth \\
        --imagenet /data/imagenet/val --classifier swin_t=swin_tiny_patch4_window7_224.pth
    python tools/reproduce.py --miniworld      # the same code path, offline, on the bundled miniature world
    python tools/reproduce.py --print-paper    # only the expected numbers (configs/paper_results.json)

The grid is detectors {mask_rcnn, cascade_mask_rcnn} x backbones {swin_t, swin_s} x settings {FP, W4A4,
W6A6, MP4, MP6}. FP runs configs/_base_/<model>.py, the others configs/<model>_<setting>.py; MPk uses
the LRP plan that tools/lrp_plan.py makes here from the ImageNet classifier (the plans shipped in
configs/plans/ come from random weights: placeholders, see --reuse-plans). Official mmdet-2.x
checkpoints (Microsoft's Swin keys) are converted once by tools/convert_checkpoint.py, detected from
their keys. Every cell is one tools/test.py process with its own work dir; its result is kept in
<out-dir>/cells/<cell>.json with a digest of its inputs (resolved config, quantization options,
checkpoint, plan content, evaluation annotations), so a rerun skips finished cells and reruns exactly
those whose inputs changed (--force: all). Writes results.md, results.json and results.png to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import os.path as osp
import sys

from mmdet_lrpq.cli import add_subset_arg
from mmdet_lrpq.reproduce.common import PAPER, REPO, UserError
from mmdet_lrpq.reproduce.driver import reproduce
from mmdet_lrpq.reproduce.grid import COCO_BACKBONES, DETECTOR_ALIASES, DETECTORS, MINI_BACKBONE, SETTINGS
from mmdet_lrpq.reproduce.processes import visible_gpus
from mmdet_lrpq.reproduce.tables import paper_table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        epilog=__doc__.split('\n', 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    world = p.add_mutually_exclusive_group()
    world.add_argument('--coco-root', help='COCO 2017 root: annotations/, val2017/, train2017/')
    world.add_argument('--miniworld', action='store_true', help='the offline miniature world (no paper column)')
    world.add_argument('--print-paper', action='store_true', help='print the expected numbers per config and exit')
    p.add_argument(
        '--detectors',
        nargs='+',
        default=list(DETECTORS),
        metavar='D',
        help=f'subset of {", ".join(DETECTORS)} ("cascade" for short)',
    )
    p.add_argument(
        '--backbones',
        nargs='+',
        default=None,
        metavar='B',
        help=f'subset of {", ".join(COCO_BACKBONES)} (the miniature world has {MINI_BACKBONE})',
    )
    add_subset_arg(p, '--settings', SETTINGS, metavar='S', help=f'subset of {" ".join(SETTINGS)}')
    p.add_argument(
        '--checkpoint',
        action='append',
        metavar='MODEL=PATH',
        help='detector checkpoint, e.g. mask_rcnn_swin_t=PATH (official mmdet-2.x files are converted)',
    )
    p.add_argument(
        '--download',
        nargs='?',
        const='official',
        choices=('official', 'mmdet'),
        help='fetch the checkpoints not given with --checkpoint into --cache-dir and verify them: '
        'official (Swin-Transformer-Object-Detection, the default) or mmdet (the OpenMMLab zoo, '
        'Mask R-CNN only)',
    )
    p.add_argument(
        '--cache-dir',
        default=osp.expanduser('~/.cache/mmdet-lrpq/checkpoints'),
        help='downloaded and converted checkpoints (default: %(default)s)',
    )
    p.add_argument(
        '--trust-checkpoints',
        action='store_true',
        help='let tools/convert_checkpoint.py load with weights_only=False (trusted files only)',
    )
    p.add_argument('--imagenet', help='ImageNet images for the LRP plans (class folders or a flat folder)')
    p.add_argument(
        '--classifier',
        action='append',
        metavar='BACKBONE=PATH',
        help='ImageNet classifier weights for a plan, a timm state dict: swin_t=PATH, swin_s=PATH',
    )
    p.add_argument('--pretrained', action='store_true', help="timm's pretrained classifier weights (downloads)")
    p.add_argument('--lrp-images', type=int, default=64, help='classifier images for the LRP scores (default 64)')
    p.add_argument('--plans-dir', help='where the MP plans are made (default: <out-dir>/plans)')
    p.add_argument(
        '--reuse-plans',
        action='store_true',
        help='use the plans already in --plans-dir (<backbone>_mp<k>.json) instead of making them; '
        'random-weight plans (e.g. --plans-dir configs/plans) run marked as placeholders',
    )
    p.add_argument(
        '--val-images',
        type=int,
        metavar='N',
        help='evaluate on the first N val images only (a quick check; not comparable with the paper)',
    )
    p.add_argument(
        '--out-dir',
        help='results, per-cell records and work dirs (default: work_dirs/reproduce or work_dirs/reproduce_miniworld)',
    )
    p.add_argument(
        '--jobs',
        type=int,
        default=None,
        help='tools/test.py processes side by side (default: one per visible GPU, else 1)',
    )
    p.add_argument(
        '--gpus',
        metavar='IDS',
        help='comma-separated GPUs to spread the cells over, one GPU per process (default: '
        'CUDA_VISIBLE_DEVICES, else every GPU torch sees; "none" keeps every process on the CPU '
        'or its own default)',
    )
    p.add_argument('--force', action='store_true', help='rerun finished cells too')
    p.add_argument('--dry-run', action='store_true', help='print the commands a run would execute, run nothing')
    args = p.parse_args(argv)
    args.detectors = list(dict.fromkeys(DETECTOR_ALIASES.get(d, d) for d in args.detectors))
    bad = [d for d in args.detectors if d not in DETECTORS]
    if bad:
        p.error(f'--detectors: unknown {bad}; choose from {", ".join(DETECTORS)} (or "cascade")')
    if args.val_images is not None and args.val_images < 1:
        p.error('--val-images must be a positive integer')
    args.gpus = (
        ([] if args.gpus.strip().lower() == 'none' else [g.strip() for g in args.gpus.split(',') if g.strip()])
        if args.gpus is not None
        else visible_gpus()
    )
    if args.jobs is None:
        args.jobs = max(1, len(args.gpus))
    if args.lrp_images < 1 or args.jobs < 1:
        p.error('--lrp-images and --jobs must be positive integers')
    if args.pretrained and args.classifier:
        p.error('give either --pretrained or --classifier, not both')
    if args.miniworld and (args.download or args.classifier or args.pretrained or args.imagenet):
        p.error(
            '--miniworld brings its own detectors, classifier and images: drop --download, --classifier, '
            '--pretrained and --imagenet'
        )
    args.out_dir = osp.abspath(
        args.out_dir or osp.join(REPO, 'work_dirs', 'reproduce_miniworld' if args.miniworld else 'reproduce')
    )
    args.plans_dir = osp.abspath(args.plans_dir or osp.join(args.out_dir, 'plans'))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    try:
        if args.print_paper:
            print(paper_table(json.load(open(PAPER))))
            return 0
        return reproduce(args)
    except UserError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    except ImportError as err:  # mmengine/matplotlib live in the project's environment
        print(
            f'error: {err}; run with the project environment: .venv/bin/python tools/reproduce.py (make install)',
            file=sys.stderr,
        )
        return 2


if __name__ == '__main__':
    sys.exit(main())
