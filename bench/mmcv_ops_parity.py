"""Miniature-world AP with compiled mmcv ops vs mmdet-lrpq's torchvision backend, side by side.

    .venv/bin/python bench/mmcv_ops_parity.py        # needs compiled mmcv (make install MMCV=compiled)

For each tiny detector, FP, W4A4 and MP4 (CRL; the LRP plan of the tiny classifier) are evaluated
twice through the real ``tools/test.py``: once with ``MMDET_LRPQ_MMCV_OPS=compiled`` (mmcv's C++
ops) and once with ``MMDET_LRPQ_MMCV_OPS=torchvision`` (RoIAlign, NMS, ... from
``mmdet_lrpq.ops``), the same calibration image, val split and thread count. Writes
``results/mmcv_ops_parity.json`` and the table between the ``mmcv_ops_parity`` markers of
docs/benchmarks.md. The target: every AP equal to 0.1.
"""

from __future__ import annotations

import os
import os.path as osp
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from mmdet_lrpq.miniworld import experiments as ex

try:
    from bench import common
except ImportError:  # python bench/mmcv_ops_parity.py: bench/ is sys.path[0]
    import common

REPO = common.REPO
DOC = osp.join(REPO, common.BENCHMARKS_PAGE)
MARKERS = ('<!-- mmcv_ops_parity:begin -->', '<!-- mmcv_ops_parity:end -->')
BACKENDS = ('compiled', 'torchvision')
SETTINGS = (ex.Setting('FP'), ex.Setting('W4A4', bits=4, method='crl'), ex.Setting('MP4', plan_k=4, method='crl'))


def pairs(rows: list[dict]):
    """(detector, setting, compiled row, torchvision row, largest AP difference) for every complete pair."""
    for det in dict.fromkeys(r['detector'] for r in rows):
        for setting in dict.fromkeys(r['setting'] for r in rows if r['detector'] == det):
            pair = {r['backend']: r for r in rows if r['detector'] == det and r['setting'] == setting}
            if set(pair) == set(BACKENDS):
                a, b = pair['compiled'], pair['torchvision']
                yield det, setting, a, b, max(abs(a[k] - b[k]) for k in ('box_ap', 'mask_ap'))


def table(rows: list[dict]) -> str:
    lines = [
        '| detector | setting | box AP compiled | box AP torchvision | mask AP compiled | mask AP torchvision '
        '| largest difference |',
        '|---|---|---|---|---|---|---|',
    ]
    for det, setting, a, b, diff in pairs(rows):
        lines.append(
            f'| {det} | {setting} | {a["box_ap"]:.1f} | {b["box_ap"]:.1f} '
            f'| {a["mask_ap"]:.1f} | {b["mask_ap"]:.1f} | {diff:.2f} |'
        )
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, detectors=True)
    parser.add_argument('--jobs', type=int, default=2)
    common.add_outputs(parser, 'mmcv_ops_parity', block='table')
    args = parser.parse_args(argv)
    if args.tables_only:
        result = common.saved_results(args.out, 'python bench/mmcv_ops_parity.py')
        common.publish(table(result['rows']), DOC, MARKERS, result['command'], update=not args.no_doc)
        return 0
    ex.require_checkpoints(args.detectors)
    ex.ensure_data()
    os.makedirs(args.work_dir, exist_ok=True)
    plans = {(4, 'lrp_qvit'): ex.make_plan(4, args.work_dir)}
    runs = [(det, s, b) for det in args.detectors for s in SETTINGS for b in BACKENDS]

    def one(item):
        det, setting, backend = item
        os.environ['MMDET_LRPQ_MMCV_OPS'] = backend  # read by each tools/test.py process at its start
        row = ex.evaluate(det, setting, plans, osp.join(args.work_dir, backend), threads=1)
        row['backend'] = backend
        print(f'{det} {setting.name} {backend}: box {row["box_ap"]:.1f} mask {row["mask_ap"]:.1f}', flush=True)
        return row

    t0 = time.time()
    # One environment variable for the whole process: run the two backends one after the other.
    rows = []
    for backend in BACKENDS:
        with ThreadPoolExecutor(args.jobs) as pool:
            rows += list(pool.map(one, [r for r in runs if r[2] == backend]))
    os.environ.pop('MMDET_LRPQ_MMCV_OPS', None)
    result = {
        'rows': rows,
        'seconds': round(time.time() - t0, 1),
        'machine': platform.processor() or platform.machine(),
        'command': 'python bench/mmcv_ops_parity.py',
    }
    common.write_json(args.out, result)
    md = table(rows)
    common.publish(md, DOC, MARKERS, result['command'], update=not args.no_doc)
    worst = max((diff for *_, diff in pairs(rows)), default=0.0)
    print(f'largest AP difference compiled vs torchvision: {worst:.2f} (target <= 0.1)')
    return 0 if worst <= 0.1 + 1e-9 else 1


if __name__ == '__main__':
    sys.exit(main())
