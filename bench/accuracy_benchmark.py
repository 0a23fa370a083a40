"""Accuracy beyond the papers' protocol: reconstruction and measured-sensitivity bit plans, over calibration sets.

    .venv/bin/python bench/accuracy_benchmark.py                 # everything (resumable: per-run JSON)
    .venv/bin/python bench/accuracy_benchmark.py --detectors mask_rcnn --sets 4
    .venv/bin/python bench/accuracy_benchmark.py --tables-only   # rewrite the tables from results/accuracy_benchmark.json

For each tiny detector of the miniature world (Swin Mask R-CNN, Swin Cascade Mask R-CNN), CRL, detector
scope, on each of ``--sets`` disjoint calibration sets of ``--set-size`` images drawn in order from a
64-image calibration pool (``data/miniworld_accuracy_pool``, generated if missing; disjoint from train
and val):

* W4A4 (uniform 4 bits), MP4 with the LRP plan of the tiny Swin classifier (``lrp_qvit``, computed once
  by ``tools/lrp_plan.py``) and MP4 with the detector's measured-sensitivity plan (``tools/sensitivity_plan.py``
  on that calibration set); every MP4 plan at weight memory <= uniform 4 bits over the detector's sites
  (the MP4 ``uniform`` allocator gives exactly the W4A4 bits, so W4A4 is its row);
* each without and with reconstruction (``QuantizationHook(reconstruct=...)``, settings in the JSON);
* ``sensitivity_bops``: the same measured sensitivity under a second budget, BOPs <= uniform 4 bits'
  (``--bops-bits 4``), without reconstruction — the control for how much of the sensitivity plan's
  gain is the higher activation bits a weight-only budget lets it spend.

Evaluations run in-process with the hook's own code (``quantize_detector``: calibration images,
calibration, reparameterization, reconstruction), each detector built once and deep-copied per run;
CocoMetric on the 200-image val split. Each run is saved as it finishes (``<work-dir>/runs/``), so an
interrupted benchmark resumes. ``--ablations [NAME ...]`` adds, on the first set, Mask R-CNN W4A4
reconstructed with one setting changed (``ABLATIONS``: heads layer by layer, heads left as calibrated,
no QDrop, a 4x longer schedule; all of them without names). ``--breakdown``
adds, on the first set, Mask R-CNN W4A4 without reconstruction with one part of the detector
(backbone, neck, RPN head, RoI head) at W8A8: where the 4-bit loss comes from.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import os.path as osp
import platform
import statistics
import subprocess
import sys
import time

from mmdet_lrpq.miniworld import experiments as ex

try:
    from bench import common
except ImportError:  # python bench/accuracy_benchmark.py: bench/ is sys.path[0]
    import common

REPO = common.REPO
DOC = common.BENCHMARKS_PAGE

POOL = osp.join(REPO, 'data', 'miniworld_accuracy_pool')
POOL_SIZE = 64
MARKERS = ('<!-- accuracy_benchmark:begin -->', '<!-- accuracy_benchmark:end -->')
COMMAND = 'python bench/accuracy_benchmark.py'
# (setting, allocator, reconstruction off/on); sensitivity_bops: the sensitivity plan under a second budget,
# BOPs <= uniform 4 bits', the control for how much of its gain is activation bits (no reconstruction: the
# question is the plan's)
SETTINGS = (
    ('W4A4', 'uniform', (False, True)),
    ('MP4', 'lrp_qvit', (False, True)),
    ('MP4', 'sensitivity', (False, True)),
    ('MP4', 'sensitivity_bops', (False,)),
)
MP4_ALLOCATORS = tuple(a for setting, a, _ in SETTINGS if setting == 'MP4')
# the miniature world's numbers before this benchmark (docs/benchmarks.md, ap_benchmark: CRL, 1 image)
TODAY = {
    'mask_rcnn': {'FP': 63.1, 'W4A4': 57.8, 'MP4': 57.6},
    'cascade_mask_rcnn': {'FP': 76.3, 'W4A4': 75.1, 'MP4': 75.0},
}


def reconstruct_settings(iters: int) -> dict:
    return dict(iters=iters)


def ensure_pool(log) -> list[int]:
    """The calibration pool's image ids, generating the pool (seeded) if it is missing."""
    ann = osp.join(POOL, 'annotations', 'instances_calib.json')
    if not osp.isfile(ann):
        from mmdet_lrpq.miniworld import generate

        log(f'generating the calibration pool {POOL} ({POOL_SIZE} images)')
        generate(POOL, sizes=dict(train=0, val=0, calib=POOL_SIZE, cls_train=0, cls_val=0))
    return [image['id'] for image in json.load(open(ann))['images']]


def calib_options(ids: list[int]) -> dict:
    return dict(
        data_root=osp.relpath(POOL, REPO) + '/',
        ann_file='annotations/instances_calib.json',
        img_prefix='calib/',
        image_ids=list(ids),
    )


class Detector:
    """One tiny detector built once: its config, float model, val loader and evaluator."""

    def __init__(self, name: str):
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        from mmengine.config import Config
        from mmengine.evaluator import Evaluator
        from mmengine.runner import Runner, load_checkpoint

        import mmdet_lrpq

        register_all_modules(init_default_scope=True)
        mmdet_lrpq.register_all_modules()
        self.name = name
        float_cfg, self.quant_cfg, self.checkpoint = ex.DETECTORS[name]
        cfg = Config.fromfile(osp.join(REPO, float_cfg))
        root = osp.join(REPO, 'data', 'miniworld') + '/'
        cfg.test_dataloader.dataset.data_root = root
        cfg.test_evaluator.ann_file = root + 'annotations/instances_val.json'
        cfg.test_dataloader.num_workers = 0  # in-process: the val images load in the main process
        cfg.test_dataloader.persistent_workers = False
        self.cfg = cfg
        self.model = MODELS.build(cfg.model)
        load_checkpoint(self.model, self.checkpoint, map_location='cpu', logger='silent')
        self.model.cfg = cfg
        self.model.eval()
        self.loader = Runner.build_dataloader(cfg.test_dataloader)
        self.evaluator = Evaluator(cfg.test_evaluator)
        self.evaluator.dataset_meta = self.loader.dataset.metainfo

    def evaluate(self, model) -> tuple[float, float]:
        import torch

        with torch.no_grad():
            for data in self.loader:
                self.evaluator.process(data_samples=model.test_step(data), data_batch=data)
        metrics = self.evaluator.evaluate(len(self.loader.dataset))
        return 100 * metrics['coco/bbox_mAP'], 100 * metrics['coco/segm_mAP']


def hook_options(setting: str, plan: str | None, reconstruct: dict | None, ids: list[int]) -> dict:
    options = dict(method='crl', calib=calib_options(ids))
    if plan is None:
        options.update(w_bits=4, a_bits=4)
    else:
        options['plan'] = osp.relpath(plan, REPO)
    if reconstruct is not None:
        options['reconstruct'] = reconstruct
    return options


def cli(det: Detector, options: dict) -> str:
    """The tools/test.py command that runs the same evaluation as one process."""
    flat = []
    for key, value in options.items():
        if isinstance(value, dict):
            flat += [f'custom_hooks.0.{key}.{k}={json.dumps(v).replace(" ", "")}' for k, v in value.items()]
        else:
            flat.append(f'custom_hooks.0.{key}={value}')
    return (
        f'python tools/test.py {det.quant_cfg} {osp.relpath(det.checkpoint, REPO)} --data-root data/miniworld '
        f'--cfg-options ' + ' '.join(flat)
    )


def run_one(det: Detector, tag: str, options: dict, path: str, extra: dict, log) -> dict:
    """Quantize a copy of the detector with the hook's options and evaluate it (or read the saved run)."""
    from mmdet_lrpq.config import QuantConfig
    from mmdet_lrpq.engine.calib_data import CalibSettings
    from mmdet_lrpq.engine.quantize import quantize_detector

    key = {'options': options, 'detector': det.name}
    if osp.isfile(path):
        saved = json.load(open(path))
        if saved.get('key') == key:
            return saved['row']
    model = copy.deepcopy(det.model)
    t0 = time.time()
    quant = {k: v for k, v in options.items() if k != 'calib'}
    if 'plan' in quant:
        quant['plan'] = osp.join(REPO, quant['plan'])
    calib = dict(options['calib'], data_root=osp.join(REPO, options['calib']['data_root']))
    report = quantize_detector(
        model,
        det.cfg,
        QuantConfig(**quant),
        CalibSettings.from_options(calib),
        progress=False,
        logger=logging.getLogger('accuracy_benchmark'),
    )
    quant_seconds = time.time() - t0
    box, mask = det.evaluate(model)
    t = report.totals
    rec = report.calibration.get('reconstruction')
    row = {
        'detector': det.name,
        **extra,
        'box_ap': box,
        'mask_ap': mask,
        'avg_w_bits': t['avg_weight_bits'],
        'avg_a_bits': t['avg_act_bits'],
        'weight_mb': t['weight_mb'],
        'weight_bits': t['total_weight_bits'],
        'gbops': t['bops'] / 1e9,
        'calibration_ids': report.calibration_ids,
        'quant_seconds': round(quant_seconds, 1),
        'eval_seconds': round(time.time() - t0 - quant_seconds, 1),
        'command': cli(det, options),
    }
    if rec:
        errors = rec['relative_error'].values()
        row.update(
            recon_seconds=rec['seconds'],
            recon_block_seconds=rec['block_seconds'],
            recon_head_seconds=rec['head_seconds'],
            recon_units=rec['blocks'] + rec['heads'] + rec['layers'],
            recon_error_before=statistics.mean(e[0] for e in errors),
            recon_error_after=statistics.mean(e[1] for e in errors),
        )
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump({'key': key, 'row': row}, f, indent=1)
    os.replace(path + '.tmp', path)
    recon = f', reconstruction {rec["seconds"]:.0f}s' if rec else ''
    log(
        f'{det.name:18s} {tag:44s} box {box:5.1f} mask {mask:5.1f} {t["weight_mb"]:.3f} MB '
        f'(quant {quant_seconds:.0f}s{recon})'
    )
    return row


def sensitivity_plan(det: Detector, ids: list[int], set_index: int, plan_dir: str, log, bops: bool = False) -> str:
    """The detector's measured-sensitivity MP4 plan on one calibration set (a tools/sensitivity_plan.py
    process with the benchmark's torch threads); ``bops``: also at no more BOPs than uniform 4 bits, from
    the same measured sensitivity."""
    plain = osp.join(plan_dir, f'{det.name}_set{set_index}_mp4_sensitivity.json')
    out = plain.replace('.json', '_bops.json') if bops else plain
    if not osp.isfile(out):
        c = calib_options(ids)
        argv = [
            det.quant_cfg,
            osp.relpath(det.checkpoint, REPO),
            '--target',
            'mp4',
            '--out',
            osp.relpath(out, REPO),
            '--calib',
            f'data_root={c["data_root"]}',
            f'ann_file={c["ann_file"]}',
            f'img_prefix={c["img_prefix"]}',
            f'image_ids=[{",".join(map(str, ids))}]',
            '--no-progress',
            '--scores-cache',
            osp.relpath(plain + '.scores.json', REPO),
        ] + (['--bops-bits', '4'] if bops else [])
        t0 = time.time()
        import torch

        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        subprocess.run(
            [sys.executable, osp.join(REPO, 'tools', 'sensitivity_plan.py'), *argv], check=True, cwd=REPO, env=env
        )
        log(f'sensitivity plan {osp.relpath(out, REPO)} [{time.time() - t0:.0f}s]')
    return out


BREAKDOWN_PARTS = ('backbone', 'neck', 'rpn_head', 'roi_head')
# variant -> the reconstruction settings' change, from the benchmark's settings
ABLATIONS = {
    'heads layer by layer': lambda r: dict(heads='layer'),
    'heads as calibrated': lambda r: dict(heads='none'),
    'no QDrop': lambda r: dict(drop_prob=0.0),
    '4x steps': lambda r: dict(iters=4 * r['iters']),
}


def part_at_8_bits(part: str, plan_dir: str) -> str:
    """A plan with every site of one part of the detector at W8A8 and the rest at W4A4 (a diagnostic:
    it spends more memory than W4A4)."""
    from mmdet_lrpq.plan import CATCH_ALL, BitPlan

    path = osp.join(plan_dir, f'w4a4_{part}_w8a8.json')
    if not osp.isfile(path):
        BitPlan(
            {f're:{part}\\..*': (8, 8), CATCH_ALL: (4, 4)}, allocator='manual', command=f'{COMMAND} --breakdown'
        ).save(path)
    return path


def quantized_runs(det: Detector, args, sets: list[list[int]], plan_dir: str, lrp_plan: str, recon: dict, log):
    """The quantized runs of one detector, in order, as ``(tag, hook options, row fields)``: the settings
    on each chosen set, then the ablations and the breakdown. A generator, so that a set's sensitivity
    plans (and a breakdown's plan) are made just before its runs."""
    order = args.only_sets if args.only_sets is not None else range(len(sets))
    for s in order:
        image_ids = sets[s]
        plans = {
            'uniform': None,
            'lrp_qvit': lrp_plan,
            'sensitivity': sensitivity_plan(det, image_ids, s, plan_dir, log),
            'sensitivity_bops': sensitivity_plan(det, image_ids, s, plan_dir, log, bops=True),
        }
        for setting, allocator, recs in SETTINGS:
            for rec in (r for r in recs if not (r and allocator in args.skip_reconstruction)):
                tag = f'set{s}_{setting}_{allocator}{"_rec" if rec else ""}'
                options = hook_options(setting, plans[allocator], recon if rec else None, image_ids)
                yield tag, options, dict(setting=setting, allocator=allocator, reconstruct=rec, set=s)
    if args.ablations is not None and det.name == 'mask_rcnn':
        chosen = [a for a in ABLATIONS if not args.ablations or a.replace(' ', '_') in args.ablations]
        for variant, change in ((a, ABLATIONS[a](recon)) for a in chosen):
            tag = 'set0_W4A4_uniform_rec_' + '_'.join(variant.split())
            options = hook_options('W4A4', None, dict(recon, **change), sets[0])
            yield tag, options, dict(setting='W4A4', allocator='uniform', reconstruct=True, set=0, variant=variant)
    if args.breakdown and det.name == 'mask_rcnn':
        for part in BREAKDOWN_PARTS:
            tag = f'set0_W4A4_uniform_{part}_w8a8'
            options = hook_options('W4A4', part_at_8_bits(part, plan_dir), None, sets[0])
            variant = f'{part} at W8A8'
            yield tag, options, dict(setting='W4A4', allocator='uniform', reconstruct=False, set=0, variant=variant)


def aggregate(rows: list[dict]) -> list[dict]:
    """One line per (detector, setting, allocator, reconstruction, variant): mean/std/range over the sets."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(
            (r['detector'], r['setting'], r['allocator'], r['reconstruct'], r.get('variant', '')), []
        ).append(r)
    out = []
    for (det, setting, allocator, rec, variant), rs in groups.items():
        box, mask = [r['box_ap'] for r in rs], [r['mask_ap'] for r in rs]
        line = {
            'detector': det,
            'setting': setting,
            'allocator': allocator,
            'reconstruct': rec,
            'variant': variant,
            'sets': len(rs),
            'box_mean': statistics.mean(box),
            'box_std': statistics.pstdev(box),
            'box_min': min(box),
            'box_max': max(box),
            'mask_mean': statistics.mean(mask),
            'mask_std': statistics.pstdev(mask),
            'mask_min': min(mask),
            'mask_max': max(mask),
            'weight_mb': max(r['weight_mb'] for r in rs),
            'weight_bits': max(r['weight_bits'] for r in rs),
            'avg_a_bits': statistics.mean(r['avg_a_bits'] for r in rs),
            'gbops': statistics.mean(r['gbops'] for r in rs),
        }
        if rec:
            line['recon_seconds'] = statistics.mean(r['recon_seconds'] for r in rs)
        out.append(line)
    return out


def _fmt(v: float, std: float | None = None) -> str:
    return f'{v:.1f}' if std is None else f'{v:.1f} ± {std:.1f}'


def target_checks(lines: list[dict], rows: list[dict]) -> list[tuple[str, str, str]]:
    """(target, figures, verdict) on the mean box AP over the calibration sets (0.1 as printed)."""

    def line(det, setting, allocator, rec):
        found = [
            g
            for g in lines
            if (g['detector'], g['setting'], g['allocator'], g['reconstruct'], g['variant'])
            == (det, setting, allocator, rec, '')
        ]
        return found[0] if found else None

    out = []
    fp = next((r['box_ap'] for r in rows if r['detector'] == 'mask_rcnn' and r['setting'] == 'FP'), None)
    w4r = line('mask_rcnn', 'W4A4', 'uniform', True)
    if fp is not None and w4r:
        gap = round(w4r['box_mean'] - fp, 1) + 0.0
        out.append(
            (
                'Mask R-CNN: W4A4 with reconstruction within 1.5 AP of float',
                f'{w4r["box_mean"]:.1f} vs {fp:.1f} ({gap:+.1f})',
                common.verdict(-gap - 1.5),
            )
        )
    for rec in (False, True):
        w4 = line('mask_rcnn', 'W4A4', 'uniform', rec)
        mps = [g for a in MP4_ALLOCATORS if (g := line('mask_rcnn', 'MP4', a, rec))]
        if w4 and mps:
            best = max(mps, key=lambda g: g['box_mean'])
            verdict = common.verdict(w4['box_mean'] + 0.5 - best['box_mean'])
            if best['weight_bits'] > w4['weight_bits']:
                verdict = '**missed**: more weight memory'
            out.append(
                (
                    f'Mask R-CNN: best MP4 >= W4A4 + 0.5, no more weight memory ({"with" if rec else "without"} '
                    f'reconstruction)',
                    f'{best["allocator"]} {best["box_mean"]:.1f} vs {w4["box_mean"]:.1f}; '
                    f'{best["weight_mb"]:.3f} vs {w4["weight_mb"]:.3f} MB',
                    verdict,
                )
            )
    # today's Cascade figures are single one-image calibrations, the top of that protocol's spread: the
    # settings this benchmark adds (reconstruction, measured-sensitivity plans) are held to them; every
    # setting, the papers' protocol at 16 images included, to that protocol's mean over 8 one-image sets
    today = TODAY['cascade_mask_rcnn']
    cascade = [g for g in lines if g['detector'] == 'cascade_mask_rcnn' and g['setting'] in today and not g['variant']]
    new = [g for g in cascade if g['reconstruct'] or g['allocator'].startswith('sensitivity')]
    protocol = todays_protocol_means()
    for what, ref, judged in (
        ("no new setting (reconstruction, sensitivity plans) worse than today's figures", today, new),
        (
            "no setting worse than today's protocol, mean over 8 one-image calibrations",
            protocol,
            cascade if protocol else [],
        ),
    ):
        if judged:
            short, g = min(((g['box_mean'] - ref[g['setting']], g) for g in judged), key=lambda w: w[0])
            out.append(
                (
                    f'Cascade: {what} (W4A4 {ref["W4A4"]:.1f}, MP4 {ref["MP4"]:.1f} box)',
                    f'worst: {g["setting"]} {g["allocator"]}{" + reconstruction" if g["reconstruct"] else ""} '
                    f'{g["box_mean"]:.1f} ({round(short, 1) + 0.0:+.1f})',
                    common.verdict(-short),
                )
            )
    return out


def todays_protocol_means() -> dict | None:
    """Cascade box AP of the default protocol (CRL, one calibration image) averaged over the one-image
    sets of results/calibration_variance.json, or None where that benchmark has not been run."""
    path = osp.join(REPO, 'results', 'calibration_variance.json')
    if not osp.isfile(path):
        return None
    rows = json.load(open(path))['rows']
    out = {}
    for setting, name in (('W4A4', 'W4A4 CRL'), ('MP4', 'MP4 CRL')):
        box = [
            r['box_ap']
            for r in rows
            if r['detector'] == 'cascade_mask_rcnn'
            and r['setting'] == name
            and r['n'] == 1
            and r.get('batch_size', 1) == 1
        ]
        if not box:
            return None
        out[setting] = statistics.mean(box)
    return out


def tables(rows: list[dict], skipped: dict | None = None) -> str:
    lines = aggregate([r for r in rows if r['setting'] != 'FP'])
    out = []
    for det in dict.fromkeys(r['detector'] for r in rows):
        fp = next((r for r in rows if r['detector'] == det and r['setting'] == 'FP'), None)
        mine = [g for g in lines if g['detector'] == det and not g['variant']]
        sets = max((g['sets'] for g in mine), default=0)
        out += [
            f'**{det}: mean ± std over {sets} calibration sets (box / mask AP; range min–max)**'
            + (f' — float {fp["box_ap"]:.1f} / {fp["mask_ap"]:.1f}' if fp else ''),
            '',
            '| setting | allocator | reconstruction | box AP | box range | mask AP | mask range | weight MB | '
            'avg A bits | GBOPs | reconstruction s |',
            '|---|---|---|---|---|---|---|---|---|---|---|',
        ]
        for g in mine:
            out.append(
                f'| {g["setting"]} | {g["allocator"]} | {"yes" if g["reconstruct"] else "no"} | '
                f'{_fmt(g["box_mean"], g["box_std"])} | {g["box_min"]:.1f}–{g["box_max"]:.1f} | '
                f'{_fmt(g["mask_mean"], g["mask_std"])} | {g["mask_min"]:.1f}–{g["mask_max"]:.1f} | '
                f'{g["weight_mb"]:.3f} | {g["avg_a_bits"]:.2f} | {g["gbops"]:.2f} | '
                f'{format(g["recon_seconds"], ".0f") if g.get("recon_seconds") else "—"} |'
            )
        if (skipped or {}).get(det):
            out += [
                '',
                f'Not run: reconstruction of {", ".join(skipped[det])} '
                f'(`--skip-reconstruction {" ".join(skipped[det])}`).',
            ]
        out.append('')
    ablations = [g for g in lines if g['variant']]
    if ablations:
        out += [
            '**Ablations and breakdown (first calibration set only; the full rows above are the mean of all sets)**',
            '',
            '| detector | setting | reconstruction | variant | box AP | mask AP | weight MB | reconstruction s |',
            '|---|---|---|---|---|---|---|---|',
        ]
        kinds = {(g['detector'], g['setting'], g['allocator'], g['reconstruct']) for g in ablations}
        first = [
            r
            for r in rows
            if r.get('set') == 0
            and not r.get('variant')
            and (r['detector'], r['setting'], r['allocator'], r['reconstruct']) in kinds
        ]

        def variant_row(r: dict, variant: str, box: float, mask: float) -> str:
            return (
                f'| {r["detector"]} | {r["setting"]} | {"yes" if r["reconstruct"] else "no"} | {variant} | '
                f'{box:.1f} | {mask:.1f} | {r["weight_mb"]:.3f} | '
                f'{format(r["recon_seconds"], ".0f") if r.get("recon_seconds") else "—"} |'
            )

        for r in first:
            default = 'default (heads whole, QDrop)' if r['reconstruct'] else 'default (every site at 4 bits)'
            out.append(variant_row(r, default, r['box_ap'], r['mask_ap']))
        out += [variant_row(g, g['variant'], g['box_mean'], g['mask_mean']) for g in ablations]
        out.append('')
    out += [
        '**Against the targets** (mean box AP over the calibration sets)',
        '',
        '| target | figures | verdict |',
        '|---|---|---|',
    ]
    out += [f'| {t} | {fig} | {v} |' for t, fig, v in target_checks(lines, rows)]
    return '\n'.join(out) + '\n'


def write_tables(rows: list[dict], args, skipped: dict | None = None) -> None:
    markdown = tables(rows, skipped)
    common.write_markdown(args.out, COMMAND, markdown)
    common.publish(markdown, osp.join(REPO, DOC), MARKERS, COMMAND, update=not args.no_doc)


def main(argv=None) -> None:
    parser = common.parser(__doc__, detectors=True)
    parser.add_argument('--sets', type=int, default=4, help='disjoint calibration sets')
    parser.add_argument('--set-size', type=int, default=16, help='images per calibration set')
    parser.add_argument(
        '--only-sets',
        type=int,
        nargs='+',
        default=None,
        help='run only these set indices, in this order (several processes can share the sets; '
        'a final run without it gathers every saved run into the JSON and tables)',
    )
    parser.add_argument('--iters', type=int, default=300, help='reconstruction steps per unit')
    parser.add_argument(
        '--ablations',
        nargs='*',
        default=None,
        choices=[a.replace(' ', '_') for a in ABLATIONS],
        help='ablation runs (first set, Mask R-CNN, W4A4 with reconstruction): these, or all',
    )
    parser.add_argument(
        '--skip-reconstruction',
        nargs='+',
        default=[],
        metavar='ALLOCATOR',
        choices=[a for _, a, recs in SETTINGS if True in recs],
        help='do not run the reconstruction rows of these allocators for --detectors (recorded in '
        'the JSON and under the tables: a shorter benchmark on few cores)',
    )
    parser.add_argument(
        '--breakdown',
        action='store_true',
        help='W4A4 with one part of the detector at W8A8 (first set, Mask R-CNN, no reconstruction)',
    )
    parser.add_argument('--threads', type=int, default=1, help='torch threads')
    common.add_outputs(parser, 'accuracy_benchmark')
    args = parser.parse_args(argv)
    if args.tables_only:
        report = common.saved_results(args.out, COMMAND)
        return write_tables(report['rows'], args, report.get('skipped_reconstruction'))
    import torch

    torch.set_num_threads(args.threads)
    start = time.time()
    log = lambda msg: print(f'[{time.time() - start:6.0f}s] {msg}', flush=True)  # noqa: E731
    ex.require_checkpoints(args.detectors)
    ex.ensure_data(log)
    ids = ensure_pool(log)
    if args.sets * args.set_size > len(ids):
        sys.exit(
            f'{args.sets} sets of {args.set_size} images need {args.sets * args.set_size}; the pool has {len(ids)}'
        )
    sets = [ids[i * args.set_size : (i + 1) * args.set_size] for i in range(args.sets)]
    if args.only_sets is not None and not all(0 <= i < args.sets for i in args.only_sets):
        sys.exit(f'--only-sets {args.only_sets}: set indices must be in 0..{args.sets - 1} (--sets {args.sets})')
    plan_dir = osp.join(args.work_dir, 'plans')
    os.makedirs(plan_dir, exist_ok=True)
    lrp_plan = ex.make_plan(4, plan_dir, 'lrp_qvit', log=log)
    recon = reconstruct_settings(args.iters)
    rows = []
    for name in args.detectors:
        det = Detector(name)
        runs = osp.join(args.work_dir, 'runs', name)
        fp_path = osp.join(runs, 'FP.json')
        if osp.isfile(fp_path):
            fp = json.load(open(fp_path))
        else:
            t0 = time.time()
            box, mask = det.evaluate(det.model)
            fp = {
                'detector': name,
                'setting': 'FP',
                'allocator': None,
                'reconstruct': False,
                'box_ap': box,
                'mask_ap': mask,
                'eval_seconds': round(time.time() - t0, 1),
                'command': f'python tools/test.py {ex.DETECTORS[name][0]} {osp.relpath(det.checkpoint, REPO)} '
                f'--data-root data/miniworld',
            }
            os.makedirs(runs, exist_ok=True)
            json.dump(fp, open(fp_path, 'w'), indent=1)
            log(f'{name:18s} FP box {box:5.1f} mask {mask:5.1f}')
        rows.append(fp)
        for tag, options, extra in quantized_runs(det, args, sets, plan_dir, lrp_plan, recon, log):
            rows.append(run_one(det, tag, options, osp.join(runs, tag + '.json'), extra, log))
    if args.only_sets is not None:
        log(f'sets {args.only_sets} done; run without --only-sets to write {args.out} and the tables')
        return
    skipped = {name: list(args.skip_reconstruction) for name in args.detectors if args.skip_reconstruction}
    if osp.isfile(args.out):  # keep the other detectors' rows of an earlier run
        earlier = json.load(open(args.out))
        rows = [r for r in earlier['rows'] if r['detector'] not in args.detectors] + rows
        skipped = {
            **{d: a for d, a in earlier.get('skipped_reconstruction', {}).items() if d not in args.detectors},
            **skipped,
        }
    report = dict(
        command=COMMAND,
        last_invocation=' '.join([COMMAND, *(argv or sys.argv[1:])]),
        seconds=round(time.time() - start, 1),
        threads=args.threads,
        environment=dict(python=platform.python_version(), cpus=os.cpu_count(), machine=platform.machine()),
        pool=osp.relpath(POOL, REPO),
        sets=sets,
        reconstruct=recon,
        lrp_plan=osp.relpath(lrp_plan, REPO),
        skipped_reconstruction=skipped,
        aggregate=aggregate([r for r in rows if r['setting'] != 'FP']),
        rows=rows,
    )
    common.write_json(args.out, report)
    write_tables(rows, args, skipped)
    log(f'done; {args.out}')


if __name__ == '__main__':
    main()
