"""AP of the miniature world's tiny detectors, float and quantized, through the real tools.

    .venv/bin/python bench/ap_benchmark.py                 # everything (68 runs, 44 min on 2 AMD EPYC cores)
    .venv/bin/python bench/ap_benchmark.py --detectors mask_rcnn --jobs 1
    .venv/bin/python bench/ap_benchmark.py --tables-only  # rewrite the tables from results/ap_benchmark.json

For each tiny detector (Swin Mask R-CNN, Swin Cascade Mask R-CNN; checkpoints/miniworld/):

* FP, and W8A8, W6A6, MP6, W4A4, MP4 with RepQ and with CRL reparameterization (MPk: the LRP
  plan of the tiny Swin classifier, ``lrp_qvit`` allocator, weight memory <= uniform k bits);
* at MP4 with CRL, the allocators ``uniform``, ``lrp_qvit``, ``greedy`` and ``ilp`` at that same budget;
* at W4A4, CRL's clipping k in {1, 2, 3, 4} (k = inf is RepQ);
* at W4A4, RepQ and CRL calibrated on each image of the calib split in turn (``calib.image_ids``),
  to show how much the choice of the one calibration image alone moves AP and the RepQ/CRL gap.

Every row is one ``tools/test.py`` process (QuantizationHook, one calibration image from the
disjoint calib split, CocoMetric on the 200-image val split) and every plan one
``tools/lrp_plan.py`` process. Writes ``results/ap_benchmark.json`` (rows with their commands),
``results/ap_benchmark.md`` (the tables) and replaces the block between the
``<!-- ap_benchmark:begin -->`` / ``<!-- ap_benchmark:end -->`` markers of docs/benchmarks.md.
The ``time (s)`` column is each process's wall time with ``--jobs`` processes running side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from mmdet_lrpq.miniworld import experiments as ex

try:
    from bench import common
except ImportError:  # python bench/ap_benchmark.py: bench/ is sys.path[0]
    import common

REPO = common.REPO

LADDER = (('W8A8', 8, None), ('W6A6', 6, None), ('MP6', None, 6), ('W4A4', 4, None), ('MP4', None, 4))
ALLOCATORS = ('uniform', 'lrp_qvit', 'greedy', 'ilp')
CRL_KS = (1.0, 2.0, 3.0, 4.0)
CALIB_IDS = 'calib.image_ids'  # W4A4 RepQ vs CRL calibrated on each image of the calib split in turn
VARIANTS = ('crl_k', CALIB_IDS)  # hook options that make a row a sweep point, not a ladder row
MARKERS = ('<!-- ap_benchmark:begin -->', '<!-- ap_benchmark:end -->')
COMMAND = 'python bench/ap_benchmark.py'
DOC = common.BENCHMARKS_PAGE


def is_sweep_point(row: dict) -> bool:
    return any(v in row for v in VARIANTS)


def is_ladder_row(row: dict) -> bool:
    """FP, or a ladder setting at its defaults (MPk: the ``lrp_qvit`` plan; no sweep option)."""
    return row['setting'] == 'FP' or (not is_sweep_point(row) and row['allocator'] in (None, 'lrp_qvit'))


def settings() -> list[ex.Setting]:
    rows = [ex.Setting('FP')]
    for method in ('repq', 'crl'):
        rows += [ex.Setting(name, bits=bits, plan_k=k, method=method) for name, bits, k in LADDER]
    rows += [ex.Setting('MP4', plan_k=4, method='crl', allocator=a) for a in ALLOCATORS if a != 'lrp_qvit']
    rows += [ex.Setting('W4A4', bits=4, method='crl', extra={'crl_k': k}) for k in CRL_KS]
    rows += [
        ex.Setting('W4A4', bits=4, method=m, extra={CALIB_IDS: [image_id]})
        for image_id in ex.calib_image_ids()
        for m in ('repq', 'crl')
    ]
    return rows


def calibration_table(rows: list[dict]) -> list[dict]:
    """W4A4 RepQ and CRL (its default k) side by side per calibration image, with the mean over them."""
    sweep = [r for r in rows if CALIB_IDS in r]
    out = []
    for image_ids in dict.fromkeys(tuple(r[CALIB_IDS]) for r in sweep):
        pair = {r['method']: r for r in sweep if tuple(r[CALIB_IDS]) == image_ids}
        if set(pair) != {'repq', 'crl'}:
            continue
        out.append(
            {
                'calibration image': ','.join(map(str, image_ids)),
                **{
                    f'{name} {kind} AP': pair[m][f'{kind}_ap']
                    for kind in ('box', 'mask')
                    for m, name in (('repq', 'RepQ'), ('crl', 'CRL'))
                },
            }
        )
    aps = [k for k in out[0] if k.endswith(' AP')] if out else []
    if out:
        out.append({'calibration image': f'mean of {len(out)}', **{k: sum(r[k] for r in out) / len(out) for k in aps}})
    for r in out:
        for kind in ('box', 'mask'):
            r[f'CRL - RepQ {kind}'] = f'{r[f"CRL {kind} AP"] - r[f"RepQ {kind} AP"]:+.1f}'
        r.update({k: f'{r[k]:.1f}' for k in aps})
    return out


def _row(rows: list[dict], setting: str, method: str | None = None) -> dict | None:
    """The ladder row of ``setting`` (MPk: its ``lrp_qvit`` plan) with ``method``, or None."""
    found = [
        r for r in rows if is_ladder_row(r) and r['setting'] == setting and (setting == 'FP' or r['method'] == method)
    ]
    return found[0] if found else None


def target_checks(rows: list[dict], detector: str) -> list[tuple[str, str, str]]:
    """The miniature world's acceptance targets judged on one detector's ladder rows: (target, figures, verdict).

    Box AP, as the tables print it (0.1 points): float >= 50; W8A8 (W6A6) at most 0.5 (2.0) below
    float, for RepQ and CRL; at W4A4, CRL >= RepQ; MP4 (the LRP plan, CRL) >= W4A4 (CRL) with no
    more weight memory. A target whose rows were not run is left out.
    """
    mine = [r for r in rows if r['detector'] == detector]
    fp, out = _row(mine, 'FP'), []
    if fp:
        out.append(('float box AP >= 50', f'{fp["box_ap"]:.1f}', common.verdict(50.0 - fp['box_ap'])))
    for setting, bound in (('W8A8', 0.5), ('W6A6', 2.0)):
        quant = [(name, _row(mine, setting, m)) for m, name in (('repq', 'RepQ'), ('crl', 'CRL'))]
        if fp and all(r for _, r in quant):
            changes = [(name, round(r['box_ap'] - fp['box_ap'], 1) + 0.0) for name, r in quant]  # + 0.0: no '-0.0'
            out.append(
                (
                    f'{setting} within {bound:g} AP of float',
                    ', '.join(f'{c:+.1f} ({n})' for n, c in changes),
                    common.verdict(-min(c for _, c in changes) - bound),
                )
            )
    repq, crl, mp4 = _row(mine, 'W4A4', 'repq'), _row(mine, 'W4A4', 'crl'), _row(mine, 'MP4', 'crl')
    if repq and crl:
        out.append(
            (
                'W4A4: CRL >= RepQ',
                f'{crl["box_ap"]:.1f} vs {repq["box_ap"]:.1f} (mask {crl["mask_ap"]:.1f} vs {repq["mask_ap"]:.1f})',
                common.verdict(repq['box_ap'] - crl['box_ap']),
            )
        )
    if crl and mp4:
        verdict = common.verdict(crl['box_ap'] - mp4['box_ap'])
        if mp4['weight_mb'] > crl['weight_mb']:
            verdict = '**missed**: more weight memory'
        out.append(
            (
                'MP4 (LRP plan, CRL) >= W4A4 (CRL), no more weight memory',
                f'{mp4["box_ap"]:.1f} vs {crl["box_ap"]:.1f} (mask {mp4["mask_ap"]:.1f} vs {crl["mask_ap"]:.1f}), '
                f'{mp4["weight_mb"]:.2f} vs {crl["weight_mb"]:.2f} MB',
                verdict,
            )
        )
    return out


def targets_table(rows: list[dict]) -> str:
    """One table: each target, per detector its figures and whether it was met."""
    detectors = list(dict.fromkeys(r['detector'] for r in rows))
    checks = {det: {t: (fig, v) for t, fig, v in target_checks(rows, det)} for det in detectors}
    names = list(dict.fromkeys(t for det in detectors for t in checks[det]))
    lines = ['| target (box AP) | ' + ' | '.join(detectors) + ' |', '|' + '---|' * (len(detectors) + 1)]
    for name in names:
        cells = [f'{checks[d][name][0]}: {checks[d][name][1]}' if name in checks[d] else '—' for d in detectors]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def tables(rows: list[dict]) -> str:
    out = []
    for det in dict.fromkeys(r['detector'] for r in rows):
        mine = [r for r in rows if r['detector'] == det]
        ladder = [r for r in mine if is_ladder_row(r)]
        out += [
            f'**{det}: float and quantized (1 calibration image)**',
            '',
            ex.markdown_table(
                ladder,
                columns=('setting', 'method', 'box_ap', 'mask_ap', 'avg_w_bits', 'avg_a_bits', 'weight_mb', 'gbops'),
            ),
            '',
        ]
        alloc = [r for r in mine if r['setting'] == 'MP4' and r['method'] == 'crl' and not is_sweep_point(r)]
        out += [
            f'**{det}: MP4 allocators at the same budget (weight memory <= uniform 4 bit), CRL**',
            '',
            ex.markdown_table(
                alloc, columns=('allocator', 'box_ap', 'mask_ap', 'avg_w_bits', 'avg_a_bits', 'weight_mb')
            ),
            '',
        ]
        sweep = [
            dict(r, k='inf (RepQ)' if r['method'] == 'repq' else f'{r["crl_k"]:g}')
            for r in mine
            if r['setting'] == 'W4A4' and CALIB_IDS not in r and (r['method'] == 'repq' or 'crl_k' in r)
        ]
        out += [
            f'**{det}: W4A4, CRL clipping k (standard deviations)**',
            '',
            ex.markdown_table(sweep, columns=('k', 'box_ap', 'mask_ap')),
            '',
        ]
        per_image = calibration_table(mine)
        if per_image:
            out += [
                f'**{det}: W4A4, RepQ vs CRL (default k) calibrated on different single images**',
                '',
                ex.markdown_table(per_image, columns=tuple(per_image[0])),
                '',
            ]
    out += [
        "**Against the miniature-world targets** (ladder rows, calibrated on the hook's default image)",
        '',
        targets_table(rows),
        '',
    ]
    return '\n'.join(out)


def main(argv=None) -> None:
    parser = common.parser(__doc__, detectors=True)
    parser.add_argument('--jobs', type=int, default=2, help='tools/test.py processes side by side (1 thread each)')
    common.add_lrp_images(parser)
    common.add_outputs(parser, 'ap_benchmark')
    args = parser.parse_args(argv)
    if args.tables_only:
        return write_tables(common.saved_results(args.out, COMMAND)['rows'], args)
    start = time.time()
    log = lambda msg: print(f'[{time.time() - start:5.0f}s] {msg}', flush=True)  # noqa: E731
    ex.require_checkpoints(args.detectors)
    ex.ensure_data(log)
    plan_dir = osp.join(args.work_dir, 'plans')
    os.makedirs(plan_dir, exist_ok=True)
    plans = {}
    for k in (6, 4):
        for allocator in ALLOCATORS if k == 4 else ('lrp_qvit',):
            plans[(k, allocator)] = ex.make_plan(k, plan_dir, allocator, num_images=args.lrp_images, log=log)
    jobs = [(det, s) for det in args.detectors for s in settings()]
    log(f'{len(jobs)} evaluations, {args.jobs} at a time')

    def run(job):
        det, setting = job
        row = ex.evaluate(det, setting, plans, args.work_dir, threads=1 if args.jobs > 1 else None)
        log(
            f'{det:18s} {setting.tag:28s} box AP {row["box_ap"]:5.1f} mask AP {row["mask_ap"]:5.1f} '
            f'({row["seconds"]:.0f}s)'
        )
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run, jobs))
    ex.fill_float_costs(rows)
    if osp.isfile(args.out):  # keep the other detectors' rows of an earlier run (--detectors one at a time)
        kept = [r for r in json.load(open(args.out))['rows'] if r['detector'] not in args.detectors]
        rows = sorted(kept + rows, key=lambda r: list(ex.DETECTORS).index(r['detector']))
    summary_path = osp.join(ex.CKPT, 'training_summary.json')
    report = dict(
        command=COMMAND,
        last_invocation=' '.join([COMMAND, *(argv or sys.argv[1:])]),
        jobs=args.jobs,
        seconds=round(time.time() - start, 1),
        environment=dict(python=platform.python_version(), cpus=os.cpu_count()),
        training_summary=json.load(open(summary_path)) if osp.isfile(summary_path) else None,
        plans={f'mp{k}_{a}': osp.relpath(p, REPO) for (k, a), p in plans.items()},
        plan_budgets={f'mp{k}_{a}': json.load(open(p))['budget'] for (k, a), p in plans.items()},
        rows=rows,
    )
    common.write_json(args.out, report)
    write_tables(rows, args)
    log(f'done; {args.out}')


def write_tables(rows: list[dict], args: argparse.Namespace) -> None:
    """The markdown tables next to ``--out`` and, unless ``--no-doc``, in docs/benchmarks.md's block."""
    markdown = tables(rows)
    common.write_markdown(args.out, COMMAND, markdown + '\n')
    common.publish(markdown, osp.join(REPO, DOC), MARKERS, COMMAND, update=not args.no_doc)


if __name__ == '__main__':
    main()
