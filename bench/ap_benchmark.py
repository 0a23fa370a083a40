"""AP of the miniature world's tiny detectors, float and quantized, through the real tools.

    .venv/bin/python bench/ap_benchmark.py                 # everything (68 runs, 39 min on 2 AMD EPYC cores)
    .venv/bin/python bench/ap_benchmark.py --detectors mask_rcnn --jobs 1

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
``<!-- ap_benchmark:begin -->`` / ``<!-- ap_benchmark:end -->`` markers of README.md.
The ``time (s)`` column is each process's wall time with ``--jobs`` processes running side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import platform
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'tools', 'miniworld'))
import experiments as ex  # noqa: E402

LADDER = (('W8A8', 8, None), ('W6A6', 6, None), ('MP6', None, 6), ('W4A4', 4, None), ('MP4', None, 4))
ALLOCATORS = ('uniform', 'lrp_qvit', 'greedy', 'ilp')
CRL_KS = (1.0, 2.0, 3.0, 4.0)
CALIB_IDS = 'calib.image_ids'  # W4A4 RepQ vs CRL calibrated on each image of the calib split in turn
VARIANTS = ('crl_k', CALIB_IDS)  # hook options that make a row a sweep point, not a ladder row


def is_sweep_point(row: dict) -> bool:
    return any(v in row for v in VARIANTS)
MARKERS = ('<!-- ap_benchmark:begin -->', '<!-- ap_benchmark:end -->')


def settings() -> list[ex.Setting]:
    rows = [ex.Setting('FP')]
    for method in ('repq', 'crl'):
        rows += [ex.Setting(name, bits=bits, plan_k=k, method=method) for name, bits, k in LADDER]
    rows += [ex.Setting('MP4', plan_k=4, method='crl', allocator=a) for a in ALLOCATORS if a != 'lrp_qvit']
    rows += [ex.Setting('W4A4', bits=4, method='crl', extra={'crl_k': k}) for k in CRL_KS]
    rows += [ex.Setting('W4A4', bits=4, method=m, extra={CALIB_IDS: [image_id]}) for image_id in ex.calib_image_ids()
             for m in ('repq', 'crl')]
    return rows


def calibration_table(rows: list[dict]) -> list[dict]:
    """W4A4 RepQ and CRL (its default k) side by side per calibration image, with the mean over them."""
    sweep = [r for r in rows if CALIB_IDS in r]
    out = []
    for image_ids in dict.fromkeys(tuple(r[CALIB_IDS]) for r in sweep):
        pair = {r['method']: r for r in sweep if tuple(r[CALIB_IDS]) == image_ids}
        if set(pair) != {'repq', 'crl'}:
            continue
        out.append({'calibration image': ','.join(map(str, image_ids)),
                    **{f'{name} {kind} AP': pair[m][f'{kind}_ap'] for kind in ('box', 'mask')
                       for m, name in (('repq', 'RepQ'), ('crl', 'CRL'))}})
    aps = [k for k in out[0] if k.endswith(' AP')] if out else []
    if out:
        out.append({'calibration image': f'mean of {len(out)}', **{k: sum(r[k] for r in out) / len(out) for k in aps}})
    for r in out:
        for kind in ('box', 'mask'):
            r[f'CRL - RepQ {kind}'] = f"{r[f'CRL {kind} AP'] - r[f'RepQ {kind} AP']:+.1f}"
        r.update({k: f'{r[k]:.1f}' for k in aps})
    return out


def tables(rows: list[dict]) -> str:
    out = []
    for det in dict.fromkeys(r['detector'] for r in rows):
        mine = [r for r in rows if r['detector'] == det]
        ladder = [r for r in mine if r['setting'] == 'FP' or
                  (not is_sweep_point(r) and r['allocator'] in (None, 'lrp_qvit'))]
        out += [f'**{det}: float and quantized (1 calibration image)**', '',
                ex.markdown_table(ladder, columns=('setting', 'method', 'box_ap', 'mask_ap', 'avg_w_bits',
                                                   'avg_a_bits', 'weight_mb', 'gbops')), '']
        alloc = [r for r in mine if r['setting'] == 'MP4' and r['method'] == 'crl' and not is_sweep_point(r)]
        out += [f'**{det}: MP4 allocators at the same budget (weight memory <= uniform 4 bit), CRL**', '',
                ex.markdown_table(alloc, columns=('allocator', 'box_ap', 'mask_ap', 'avg_w_bits', 'avg_a_bits',
                                                  'weight_mb')), '']
        sweep = [dict(r, k='inf (RepQ)' if r['method'] == 'repq' else f"{r['crl_k']:g}") for r in mine
                 if r['setting'] == 'W4A4' and CALIB_IDS not in r and (r['method'] == 'repq' or 'crl_k' in r)]
        out += [f'**{det}: W4A4, CRL clipping k (standard deviations)**', '',
                ex.markdown_table(sweep, columns=('k', 'box_ap', 'mask_ap')), '']
        per_image = calibration_table(mine)
        if per_image:
            out += [f'**{det}: W4A4, RepQ vs CRL (default k) calibrated on different single images**', '',
                    ex.markdown_table(per_image, columns=tuple(per_image[0])), '']
    return '\n'.join(out)


def update_readme(markdown: str, command: str) -> bool:
    path = osp.join(REPO, 'README.md')
    text = open(path).read()
    begin, end = MARKERS
    if begin not in text or end not in text:
        return False
    block = f'{begin}\n<!-- generated by `{command}`; do not edit by hand -->\n\n{markdown}\n{end}'
    text = re.sub(re.escape(begin) + '.*?' + re.escape(end), lambda _: block, text, flags=re.S)
    open(path, 'w').write(text)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--detectors', nargs='+', default=list(ex.DETECTORS), choices=list(ex.DETECTORS))
    parser.add_argument('--jobs', type=int, default=2, help='tools/test.py processes side by side (1 thread each)')
    parser.add_argument('--lrp-images', type=int, default=64, help='classifier images for the LRP scores')
    parser.add_argument('--work-dir', default=osp.join(REPO, 'work_dirs', 'ap_benchmark'))
    parser.add_argument('--out', default=osp.join(REPO, 'results', 'ap_benchmark.json'))
    parser.add_argument('--no-readme', action='store_true', help='do not update README.md')
    args = parser.parse_args(argv)
    start = time.time()
    log = lambda msg: print(f'[{time.time() - start:5.0f}s] {msg}', flush=True)  # noqa: E731
    ex.require_checkpoints(args.detectors)
    ex.ensure_data(log)
    plan_dir = osp.join(args.work_dir, 'plans')
    os.makedirs(plan_dir, exist_ok=True)
    plans = {}
    for k in (6, 4):
        for allocator in (ALLOCATORS if k == 4 else ('lrp_qvit',)):
            plans[(k, allocator)] = ex.make_plan(k, plan_dir, allocator, num_images=args.lrp_images, log=log)
    jobs = [(det, s) for det in args.detectors for s in settings()]
    log(f'{len(jobs)} evaluations, {args.jobs} at a time')

    def run(job):
        det, setting = job
        row = ex.evaluate(det, setting, plans, args.work_dir, threads=1 if args.jobs > 1 else None)
        log(f'{det:18s} {setting.tag:28s} box AP {row["box_ap"]:5.1f} mask AP {row["mask_ap"]:5.1f} '
            f'({row["seconds"]:.0f}s)')
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run, jobs))
    ex.fill_float_costs(rows)
    if osp.isfile(args.out):  # keep the other detectors' rows of an earlier run (--detectors one at a time)
        kept = [r for r in json.load(open(args.out))['rows'] if r['detector'] not in args.detectors]
        rows = sorted(kept + rows, key=lambda r: list(ex.DETECTORS).index(r['detector']))
    command = 'python bench/ap_benchmark.py'
    summary_path = osp.join(ex.CKPT, 'training_summary.json')
    report = dict(command=command, last_invocation=' '.join(['python bench/ap_benchmark.py', *(argv or sys.argv[1:])]),
                  jobs=args.jobs, seconds=round(time.time() - start, 1),
                  environment=dict(python=platform.python_version(), cpus=os.cpu_count()),
                  training_summary=json.load(open(summary_path)) if osp.isfile(summary_path) else None,
                  plans={f'mp{k}_{a}': osp.relpath(p, REPO) for (k, a), p in plans.items()},
                  plan_budgets={f'mp{k}_{a}': json.load(open(p))['budget'] for (k, a), p in plans.items()},
                  rows=rows)
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(report, f, indent=1)
    markdown = tables(rows)
    with open(osp.splitext(args.out)[0] + '.md', 'w') as f:
        f.write(f'<!-- generated by `{command}` -->\n\n{markdown}\n')
    print(markdown)
    if not args.no_readme:
        print('README.md updated' if update_readme(markdown, command) else 'README.md has no ap_benchmark markers')
    log(f'done; {args.out}')


if __name__ == '__main__':
    main()
