"""Generate the miniature-world dataset (COCO instance segmentation + classification splits).

    python tools/miniworld/generate.py --out data/miniworld [--seed 0] [--workers 2]

Same seed -> byte-identical images and annotation files, whatever the number of workers.
"""

from __future__ import annotations

import argparse
import os
import time

from mmdet_lrpq.miniworld import DEFAULT_SIZES, generate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='data/miniworld', help='output root (default: data/miniworld)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--workers',
        type=int,
        default=min(2, os.cpu_count() or 1),
        help='rendering processes (does not change the output)',
    )
    for split, n in DEFAULT_SIZES.items():
        parser.add_argument(
            f'--num-{split.replace("_", "-")}',
            type=int,
            default=n,
            dest=f'num_{split}',
            help=f'images in split {split} (default {n})',
        )
    args = parser.parse_args(argv)
    sizes = {split: getattr(args, f'num_{split}') for split in DEFAULT_SIZES}
    start = time.time()
    generate(
        args.out,
        seed=args.seed,
        sizes=sizes,
        workers=args.workers,
        log=lambda msg: print(f'[{time.time() - start:6.1f}s] {msg}', flush=True),
    )
    print(f'miniature world written to {args.out} in {time.time() - start:.1f}s (seed {args.seed})')


if __name__ == '__main__':
    main()
