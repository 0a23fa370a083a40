"""How much the choice of calibration images moves AP, and how that shrinks with more images.

    .venv/bin/python bench/calibration_variance.py                  # everything, resumable (hours on 2 cores)
    .venv/bin/python bench/calibration_variance.py --jobs 1 --phases main
    .venv/bin/python bench/calibration_variance.py --tables-only    # rewrite the tables from the JSON

For both tiny detectors of the miniature world (checkpoints/miniworld/) and three settings —
W4A4 with CRL, W4A4 with RepQ, MP4 (the LRP plan of the tiny Swin classifier, ``lrp_qvit``
allocator, CRL) — calibrate on 8 disjoint sets of N images for N = 1, 4, 16, 32 and evaluate
each calibrated model with CocoMetric on the 200 val images (phase ``main``, 192 evaluations).
Phase ``old``: at N = 4 the same sets as *one* batch (``calib.batch_size=4``, the calibration
before streaming) against streaming the same images one at a time. Phase ``allocators``: the MP4
plans of the ``uniform``, ``greedy`` and ``ilp`` allocators at N = 16 on the same 8 sets
(``lrp_qvit`` is phase ``main``'s MP4). Phase ``float``: the float detectors, as a check that
this in-process evaluation gives the AP of ``tools/test.py``.

The sets are consecutive slices of a separate pool of 256 generated calibration images
(``data/miniworld_calib_pool/``, generated here when missing): set ``s`` of size N is pool images
``s·N+1 .. (s+1)·N``. The pool is the miniature world's ``calib`` split rendered with 256
images instead of 8 (same seed), so its first 8 images are exactly ``data/miniworld/calib``'s and
the N = 1 rows calibrate on the images of ``bench/ap_benchmark.py``'s per-image table;
``data/miniworld/`` itself is never touched.

Evaluations run in-process, so that process start-up does not dominate: each worker builds each
float detector once, deep-copies it per run, quantizes it with
:func:`mmdet_lrpq.engine.quantize_detector` (the code behind ``QuantizationHook``) and runs the
test loop's steps (``test_step`` per val image, CocoMetric) over val images loaded once. Every
worker uses ``--threads`` torch threads (default 1, as ``bench/ap_benchmark.py``'s processes:
float kernels round differently with other thread counts, and at 4 bits that can move AP).
Each run writes its own JSON under ``--work-dir``/runs, so an interrupted run resumes where it
stopped; ``--jobs`` worker processes claim runs from the same list.

Writes ``results/calibration_variance.json`` and replaces the block between
``<!-- calibration_variance:begin -->`` / ``<!-- calibration_variance:end -->`` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import os.path as osp
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

from mmdet_lrpq.miniworld import experiments as ex

try:
    from bench import common
except ImportError:  # python bench/calibration_variance.py: bench/ is sys.path[0]
    import common

REPO = common.REPO

POOL = osp.join(REPO, 'data', 'miniworld_calib_pool')
POOL_SIZE = 256
POOL_SEED = 0  # the miniature world's seed: pool images 1..8 are data/miniworld/calib's
NS = (1, 4, 16, 32)
NUM_SETS = 8
OLD_N = 4  # where the one-batch calibration is compared with the streamed one
ALLOCATOR_N = 16
SETTINGS = ('W4A4 CRL', 'W4A4 RepQ', 'MP4 CRL')
ALLOCATORS = ('lrp_qvit', 'uniform', 'greedy', 'ilp')
PHASES = ('float', 'main', 'old', 'allocators', 'ranges')  # ranges: parameters only, no evaluation
MARKERS = ('<!-- calibration_variance:begin -->', '<!-- calibration_variance:end -->')
COMMAND = 'python bench/calibration_variance.py'
DOC = common.BENCHMARKS_PAGE
RANGE_TARGET = 1 / 3  # range of AP over the sets at N = 16 <= this x the range at N = 1


@dataclass(frozen=True)
class Run:
    """One evaluation: a detector quantized by a setting, calibrated on one set of images."""

    detector: str
    setting: str  # one of SETTINGS, 'FP', or 'MP4 CRL <allocator>'
    n: int = 0  # images per set (0: float)
    set_index: int = 0
    batch_size: int = 1

    @property
    def tag(self) -> str:
        name = re.sub(r'[^A-Za-z0-9]+', '_', self.setting).strip('_').lower()
        return f'{self.detector}/{name}' + (f'_n{self.n}_s{self.set_index}_b{self.batch_size}' if self.n else '')

    @property
    def allocator(self) -> str | None:
        if not self.setting.startswith('MP4'):
            return None
        rest = self.setting.split()[2:]
        return rest[0] if rest else 'lrp_qvit'

    def image_ids(self) -> list[int]:
        """Pool image ids of this run's calibration set (consecutive slices of the pool)."""
        return list(range(self.set_index * self.n + 1, (self.set_index + 1) * self.n + 1))

    def quant_options(self, plans: dict[str, str]) -> dict:
        """QuantConfig options, as the miniature world's quant configs give them to the hook."""
        if self.setting.startswith('MP4'):
            return dict(plan=plans[self.allocator], method='crl')
        return dict(w_bits=4, a_bits=4, method=self.setting.split()[1].lower())


def runs(
    phases: Iterable[str], detectors: Iterable[str], ns: Iterable[int] = NS, settings: Iterable[str] = SETTINGS
) -> list[Run]:
    """Every run of the phases (``main`` and ``old`` restricted to ``ns`` / ``settings``), ordered so
    that a partial result covers whole (N, set) groups."""
    phases, detectors, settings = set(phases), list(detectors), [s for s in SETTINGS if s in set(settings)]
    out = [Run(d, 'FP') for d in detectors] if 'float' in phases else []
    if 'main' in phases:
        out += [
            Run(d, s, n, i)
            for n in sorted(set(ns), key=(1, 16, 4, 32).index)
            for i in range(NUM_SETS)
            for d in detectors
            for s in settings
        ]
    if 'old' in phases:
        out += [Run(d, s, OLD_N, i, OLD_N) for i in range(NUM_SETS) for d in detectors for s in settings]
    if 'allocators' in phases:
        out += [
            Run(d, f'MP4 CRL {a}', ALLOCATOR_N, i)
            for i in range(NUM_SETS)
            for d in detectors
            for a in ALLOCATORS
            if a != 'lrp_qvit'
        ]
    return out


def ensure_pool(log=print) -> None:
    """Generate the 256-image calibration pool if it is missing (seconds)."""
    ann = osp.join(POOL, 'annotations', 'instances_calib.json')
    if osp.isfile(ann) and len(json.load(open(ann))['images']) == POOL_SIZE:
        return
    from mmdet_lrpq.miniworld import generate

    log(f'pool: generating {POOL_SIZE} calibration images into {POOL}')
    generate(POOL, seed=POOL_SEED, sizes=dict(train=0, val=0, calib=POOL_SIZE, cls_train=0, cls_val=0), workers=2)


# ---------------------------------------------------------------------------------- one worker
class Evaluation:
    """One detector's float model, val images and evaluator settings, built once per worker."""

    def __init__(self, detector: str):
        import torch
        from mmdet.registry import DATASETS, MODELS
        from mmengine.config import Config
        from mmengine.runner import load_checkpoint

        float_cfg, _, ckpt = ex.DETECTORS[detector]
        cfg = Config.fromfile(osp.join(REPO, float_cfg))
        data_root = ex.DATA.rstrip('/') + '/'
        cfg.test_dataloader.dataset.data_root = data_root
        cfg.test_evaluator.ann_file = osp.join(data_root, 'annotations', 'instances_val.json')
        self.cfg = cfg
        self.model = MODELS.build(cfg.model)
        load_checkpoint(self.model, ckpt, map_location='cpu', logger='silent')
        self.model.eval()
        dataset = DATASETS.build(cfg.test_dataloader.dataset)
        self.metainfo = dataset.metainfo
        self.items = [dataset[i] for i in range(len(dataset))]  # the test loop's order (no shuffle, batch 1)
        torch.set_grad_enabled(False)

    def evaluate(self, model) -> dict:
        """CocoMetric (bbox, segm) of ``model`` on the val images: the steps of mmengine's TestLoop."""
        from mmengine.dataset import pseudo_collate
        from mmengine.evaluator import Evaluator

        evaluator = Evaluator(copy.deepcopy(self.cfg.test_evaluator))
        evaluator.dataset_meta = self.metainfo
        model.eval()
        for item in self.items:
            batch = pseudo_collate([copy.deepcopy(item)])  # predictions must not pile up on the cached items
            evaluator.process(data_samples=model.test_step(batch), data_batch=batch)
        return evaluator.evaluate(len(self.items))


def execute(run: Run, evaluation: Evaluation, plans: dict[str, str], logger: logging.Logger) -> dict:
    """Quantize a copy of the float detector as ``run`` says, evaluate it; the run's record."""
    from mmdet_lrpq.config import QuantConfig
    from mmdet_lrpq.engine import CalibSettings, quantize_detector

    t0 = time.perf_counter()
    model = copy.deepcopy(evaluation.model)
    record: dict = dict(
        detector=run.detector,
        setting=run.setting,
        n=run.n,
        set_index=run.set_index,
        batch_size=run.batch_size,
        allocator=run.allocator,
    )
    if run.n:
        calib = CalibSettings(
            data_root=POOL,
            ann_file='annotations/instances_calib.json',
            img_prefix='calib/',
            image_ids=run.image_ids(),
            batch_size=run.batch_size,
        )
        report = quantize_detector(
            model, evaluation.cfg, QuantConfig(**run.quant_options(plans)), calib, logger=logger, progress=False
        )
        totals = report.totals
        record.update(
            image_ids=run.image_ids(),
            calibration=report.calibration,
            avg_w_bits=totals['avg_weight_bits'],
            avg_a_bits=totals['avg_act_bits'],
            weight_mb=totals['weight_mb'],
            quant_options={k: str(v) for k, v in run.quant_options(plans).items()},
        )
    t1 = time.perf_counter()
    metrics = evaluation.evaluate(model)
    record.update(
        box_ap=100 * metrics['coco/bbox_mAP'],
        mask_ap=100 * metrics['coco/segm_mAP'],
        metrics=metrics,
        quantize_s=round(t1 - t0, 2),
        evaluate_s=round(time.perf_counter() - t1, 2),
    )
    return record


def run_path(work_dir: str, run: Run) -> str:
    return osp.join(work_dir, 'runs', run.tag + '.json')


def claim(work_dir: str, run: Run) -> bool:
    """Atomically take ``run`` for this worker (False if done or taken by another worker)."""
    path = run_path(work_dir, run)
    if osp.isfile(path):
        return False
    os.makedirs(osp.dirname(path), exist_ok=True)
    try:
        os.close(os.open(path + '.claim', os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def setup(threads: int) -> None:
    """Torch threads and the mmdet / mmdet_lrpq registries, in every process that evaluates."""
    import torch
    from mmdet.utils import register_all_modules

    import mmdet_lrpq

    torch.set_num_threads(threads)
    register_all_modules()
    mmdet_lrpq.register_all_modules()


def worker(args: argparse.Namespace) -> None:
    """Claim and execute runs until none is left (one process of ``--jobs``)."""
    import torch

    setup(args.threads)
    logger = logging.getLogger('calibration_variance')
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', stream=sys.stdout)
    plans = json.load(open(osp.join(args.work_dir, 'plans.json')))
    evaluations: dict[str, Evaluation] = {}
    for run in runs(args.phases, args.detectors, args.ns, args.settings):
        if not claim(args.work_dir, run):
            continue
        if run.detector not in evaluations:
            evaluations[run.detector] = Evaluation(run.detector)
        record = execute(run, evaluations[run.detector], plans, logger)
        record.update(threads=torch.get_num_threads(), worker=args.worker)
        path = run_path(args.work_dir, run)
        with open(path + '.tmp', 'w') as f:
            json.dump(record, f, indent=1)
        os.replace(path + '.tmp', path)
        os.remove(path + '.claim')
        print(
            f'{run.tag}: box AP {record["box_ap"]:.1f} mask AP {record["mask_ap"]:.1f} '
            f'(quantize {record["quantize_s"]:.0f} s, evaluate {record["evaluate_s"]:.0f} s)',
            flush=True,
        )


# ---------------------------------------------------------------------------------- statistics
def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (n - 1), min, max and range of the sets' APs."""
    return dict(
        mean=statistics.fmean(values),
        std=statistics.stdev(values) if len(values) > 1 else 0.0,
        min=min(values),
        max=max(values),
        range=max(values) - min(values),
        sets=len(values),
    )


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per detector, setting, N and batch size: the spread of box and mask AP over the sets."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r['n']:
            groups.setdefault((r['detector'], r['setting'], r['n'], r['batch_size']), []).append(r)
    return [
        dict(
            detector=d,
            setting=s,
            n=n,
            batch_size=b,
            box=spread([r['box_ap'] for r in g]),
            mask=spread([r['mask_ap'] for r in g]),
        )
        for (d, s, n, b), g in groups.items()
    ]


def range_verdict(at_1: dict, at_16: dict) -> str:
    """'met' if the range at N=16 is at most a third of that at N=1 (as printed, 0.1 AP), else the miss."""
    r1, r16 = round(at_1['range'], 1), round(at_16['range'], 1)
    return 'met' if r16 <= r1 * RANGE_TARGET + 1e-9 else f'**missed** ({r16:.1f} > {r1 * RANGE_TARGET:.2f})'


def _cell(s: dict) -> tuple[str, str]:
    return f'{s["mean"]:.1f} ± {s["std"]:.1f}', f'{s["min"]:.1f}–{s["max"]:.1f} ({s["range"]:.1f})'


def report_tables(report: dict) -> str:
    """The tables of a saved report (what the docs block holds)."""
    return tables(report['rows'], report.get('not_run', ()), report.get('old_vs_streamed_ranges'))


def tables(rows: list[dict], not_run: Iterable[str] = (), ranges: dict | None = None) -> str:
    """The markdown tables: spread per detector, setting and N; the range target; old vs streamed;
    allocators; and, for a partial grid, which groups of runs have no results."""
    summary = summarize(rows)
    detectors = list(dict.fromkeys(r['detector'] for r in rows))

    def pick(d: str, s: str, n: int, b: int = 1) -> dict | None:
        return next(
            (g for g in summary if (g['detector'], g['setting'], g['n'], g['batch_size']) == (d, s, n, b)), None
        )

    out = []
    fp = {r['detector']: r for r in rows if r['setting'] == 'FP'}
    for det in detectors:
        head = f' (float: {fp[det]["box_ap"]:.1f} box / {fp[det]["mask_ap"]:.1f} mask)' if det in fp else ''
        out += [
            f'**{det}: AP over {NUM_SETS} disjoint calibration sets of N images{head}**',
            '',
            '| setting | N | box AP mean ± std | box AP min–max (range) | mask AP mean ± std | '
            'mask AP min–max (range) |',
            '|---|---|---|---|---|---|',
        ]
        for s in SETTINGS:
            for n in NS:
                g = pick(det, s, n)
                if g:
                    out.append(f'| {s} | {n} | ' + ' | '.join(_cell(g['box']) + _cell(g['mask'])) + ' |')
        out.append('')
    lines = []
    for det in detectors:
        for s in SETTINGS:
            g1, g16 = pick(det, s, 1), pick(det, s, 16)
            if g1 and g16:
                lines.append(
                    f'| {det} | {s} | {g1["box"]["range"]:.1f} → {g16["box"]["range"]:.1f}: '
                    f'{range_verdict(g1["box"], g16["box"])} | {g1["mask"]["range"]:.1f} → '
                    f'{g16["mask"]["range"]:.1f}: {range_verdict(g1["mask"], g16["mask"])} |'
                )
    if lines:
        out += [
            '**Target: range over the sets at N = 16 ≤ ⅓ of the range at N = 1**',
            '',
            '| detector | setting | box AP range N=1 → N=16 | mask AP range N=1 → N=16 |',
            '|---|---|---|---|',
            *lines,
            '',
        ]
    lines = []
    for det in detectors:
        for s in SETTINGS:
            old, new = pick(det, s, OLD_N, OLD_N), pick(det, s, OLD_N)
            if not (old and new):
                continue
            pairs = paired(rows, det, s, OLD_N)
            diffs = {k: [o[f'{k}_ap'] - n[f'{k}_ap'] for o, n in pairs] for k in ('box', 'mask')}
            lines.append(
                f'| {det} | {s} | {old["box"]["mean"]:.1f} ± {old["box"]["std"]:.1f} | '
                f'{new["box"]["mean"]:.1f} ± {new["box"]["std"]:.1f} | {_diff(diffs["box"])} | '
                f'{old["mask"]["mean"]:.1f} ± {old["mask"]["std"]:.1f} | '
                f'{new["mask"]["mean"]:.1f} ± {new["mask"]["std"]:.1f} | {_diff(diffs["mask"])} |'
            )
    if lines:
        out += [
            f'**One batch of {OLD_N} (`batch_size={OLD_N}`, the calibration before streaming) vs streamed '
            f'(`batch_size=1`, per-image ranges combined), same {NUM_SETS} sets**',
            '',
            '| detector | setting | box AP one batch | box AP streamed | one batch − streamed, per set: mean '
            '(min … max) | mask AP one batch | mask AP streamed | one batch − streamed, per set |',
            '|---|---|---|---|---|---|---|---|',
            *lines,
            '',
        ]
    lines = []
    for det in detectors:
        for a in ALLOCATORS:
            g = pick(det, 'MP4 CRL' if a == 'lrp_qvit' else f'MP4 CRL {a}', ALLOCATOR_N)
            if g:
                bits = [r for r in rows if r['detector'] == det and r['setting'] == g['setting']][0]
                lines.append(
                    f'| {det} | {a} | '
                    + ' | '.join(_cell(g['box']) + _cell(g['mask']))
                    + f' | {bits["avg_w_bits"]:.2f} | {bits["avg_a_bits"]:.2f} | {bits["weight_mb"]:.2f} |'
                )
    if len(lines) > len(detectors):
        out += [
            f'**MP4 allocators at the same budget (weight memory ≤ uniform 4 bit), CRL, N = {ALLOCATOR_N}, '
            f'{NUM_SETS} sets**',
            '',
            '| detector | allocator | box AP mean ± std | box AP min–max (range) | mask AP mean ± std | '
            'mask AP min–max (range) | avg W bits | avg A bits | weight MB |',
            '|---|---|---|---|---|---|---|---|---|',
            *lines,
            '',
        ]
    if ranges:
        q1, med, q3 = ranges['ratio_quartiles']
        out += [
            f'**One batch of {ranges["n"]} vs streamed, calibrated parameters** ({ranges["detector"]}, '
            f'{ranges["setting"]}, set {ranges["set_index"]}): the one-batch clipping range over the streamed one, '
            f'per activation quantizer: wider in {ranges["wider_in_one_batch"]} of {ranges["quantizers"]}, '
            f'narrower in {ranges["narrower_in_one_batch"]}; ratio quartiles {q1:.3f} / {med:.3f} / {q3:.3f}, '
            f'min {ranges["ratio_min"]:.3f}, max {ranges["ratio_max"]:.3f}',
            '',
        ]
    missing: dict[str, int] = {}
    for tag in not_run:  # 'mask_rcnn/w4a4_crl_n4_s0_b1' -> 'mask_rcnn/w4a4_crl_n4_b1'
        group = re.sub(r'_s\d+_', '_', tag)
        missing[group] = missing.get(group, 0) + 1
    if missing:
        out += [
            '**Not run** (no results for these groups of the full grid; `python bench/calibration_variance.py` '
            'runs them): ' + ', '.join(f'`{g}` ({k})' for g, k in missing.items()),
            '',
        ]
    return '\n'.join(out)


def paired(rows: list[dict], detector: str, setting: str, n: int) -> list[tuple[dict, dict]]:
    """(one batch, streamed) runs of the same detector, setting and set of ``n`` images."""
    mine = {
        (r['set_index'], r['batch_size']): r
        for r in rows
        if r['detector'] == detector and r['setting'] == setting and r['n'] == n
    }
    return [(mine[(i, n)], mine[(i, 1)]) for i in range(NUM_SETS) if (i, n) in mine and (i, 1) in mine]


def _diff(values: list[float]) -> str:
    return f'{statistics.fmean(values):+.1f} ({min(values):+.1f} … {max(values):+.1f})' if values else '—'


def write_tables(report: dict, args: argparse.Namespace) -> None:
    markdown = report_tables(report)
    common.publish(markdown, osp.join(REPO, DOC), MARKERS, COMMAND, update=not args.no_doc)


# ---------------------------------------------------------------------------------- range check
def range_ratios(threads: int) -> dict:
    """Why one batch and streaming differ: their calibrated activation ranges, quantizer by quantizer.

    Mask R-CNN, W4A4 CRL, set 0 of 4 images, calibrated both ways; per activation quantizer the
    ratio of the one-batch clipping range (``(2^b-1)·Δ``, averaged over channels; log-√2: Δ) to the
    streamed one.
    """
    import torch

    from mmdet_lrpq.config import QuantConfig
    from mmdet_lrpq.engine import CalibSettings, quantize_detector
    from mmdet_lrpq.quant.calibrate import activation_quantizers
    from mmdet_lrpq.quant.modules import UniformQuantizer

    setup(threads)
    evaluation = Evaluation('mask_rcnn')
    logger = logging.getLogger('calibration_variance.ranges')
    widths = {}
    for batch_size in (OLD_N, 1):
        model = copy.deepcopy(evaluation.model)
        calib = CalibSettings(
            data_root=POOL,
            ann_file='annotations/instances_calib.json',
            img_prefix='calib/',
            image_ids=Run('mask_rcnn', 'W4A4 CRL', OLD_N, 0).image_ids(),
            batch_size=batch_size,
        )
        quantize_detector(
            model, evaluation.cfg, QuantConfig(w_bits=4, a_bits=4, method='crl'), calib, logger=logger, progress=False
        )
        widths[batch_size] = [
            float((q.delta * ((1 << q.bits) - 1) if isinstance(q, UniformQuantizer) else q.delta).double().mean())
            for q in activation_quantizers(model)
        ]
    ratios = torch.tensor([o / s for o, s in zip(widths[OLD_N], widths[1])], dtype=torch.float64)
    quartiles = torch.quantile(ratios, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return dict(
        detector='mask_rcnn',
        setting='W4A4 CRL',
        n=OLD_N,
        set_index=0,
        quantizers=len(ratios),
        wider_in_one_batch=int((ratios > 1).sum()),
        narrower_in_one_batch=int((ratios < 1).sum()),
        ratio_quartiles=quartiles,
        ratio_min=float(ratios.min()),
        ratio_max=float(ratios.max()),
    )


def cached_range_ratios(args: argparse.Namespace) -> dict:
    """:func:`range_ratios`, computed once per work dir."""
    path = osp.join(args.work_dir, 'range_ratios.json')
    if not osp.isfile(path):
        with open(path, 'w') as f:
            json.dump(range_ratios(args.threads), f, indent=1)
    return json.load(open(path))


# ---------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__, detectors=True)
    parser.add_argument('--phases', nargs='+', default=list(PHASES), choices=PHASES)
    parser.add_argument(
        '--ns', type=int, nargs='+', default=list(NS), choices=NS, help='set sizes of phase main (default: all)'
    )
    parser.add_argument(
        '--settings',
        nargs='+',
        default=list(SETTINGS),
        choices=SETTINGS,
        help='settings of phases main and old (default: all)',
    )
    parser.add_argument('--jobs', type=int, default=2, help='worker processes claiming runs side by side')
    parser.add_argument('--threads', type=int, default=1, help='torch threads per worker')
    common.add_lrp_images(parser)
    common.add_outputs(parser, 'calibration_variance')
    parser.add_argument('--worker', type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tables_only:
        return write_tables(common.saved_results(args.out, COMMAND), args)
    if args.worker is not None:
        return worker(args)

    start = time.time()
    log = lambda msg: print(f'[{time.time() - start:6.0f}s] {msg}', flush=True)  # noqa: E731
    ex.require_checkpoints(args.detectors)
    ex.ensure_data(log)
    ensure_pool(log)
    plan_dir = osp.join(args.work_dir, 'plans')
    os.makedirs(plan_dir, exist_ok=True)
    needed = ALLOCATORS if 'allocators' in args.phases else ('lrp_qvit',)
    plans = {}
    for allocator in needed:
        path = osp.join(plan_dir, f'swin_mini_mp4_{allocator}.json')
        plans[allocator] = path if osp.isfile(path) else ex.make_plan(4, plan_dir, allocator, args.lrp_images, log=log)
    json.dump(plans, open(osp.join(args.work_dir, 'plans.json'), 'w'), indent=1)
    for claim_file in _files(osp.join(args.work_dir, 'runs'), '.claim'):  # left by an interrupted run
        os.remove(claim_file)
    todo = [
        r
        for r in runs(args.phases, args.detectors, args.ns, args.settings)
        if not osp.isfile(run_path(args.work_dir, r))
    ]
    log(
        f'{len(todo)} of {len(runs(args.phases, args.detectors, args.ns, args.settings))} runs to do, {args.jobs} workers x '
        f'{args.threads} thread(s); logs in {args.work_dir}/worker<i>.log'
    )
    base = [
        sys.executable,
        osp.abspath(__file__),
        '--work-dir',
        args.work_dir,
        '--threads',
        str(args.threads),
        '--phases',
        *args.phases,
        '--detectors',
        *args.detectors,
        '--ns',
        *map(str, args.ns),
        '--settings',
        *args.settings,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    procs = []
    for i in range(args.jobs):
        log_file = open(osp.join(args.work_dir, f'worker{i}.log'), 'a')
        procs.append(
            subprocess.Popen(base + ['--worker', str(i)], stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        )
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f'a worker failed (exit codes {codes}); see {args.work_dir}/worker<i>.log; rerun to resume')
    # the report holds every finished run of the whole grid (earlier invocations may have run other
    # subsets) and names the runs that have no result yet, so a partial grid is never mistaken for all of it
    grid = runs(PHASES, ex.DETECTORS)
    rows = [json.load(open(run_path(args.work_dir, r))) for r in grid if osp.isfile(run_path(args.work_dir, r))]
    not_run = [r.tag for r in grid if not osp.isfile(run_path(args.work_dir, r))]
    log('comparing one-batch and streamed activation ranges')
    report = dict(
        command=COMMAND,
        last_invocation=' '.join([COMMAND, *(argv if argv is not None else sys.argv[1:])]),
        jobs=args.jobs,
        threads=args.threads,
        seconds_last_invocation=round(time.time() - start, 1),
        run_seconds_total=round(sum(r['quantize_s'] + r['evaluate_s'] for r in rows), 1),
        environment=dict(
            python=platform.python_version(), cpus=os.cpu_count(), cpu=platform.processor() or platform.machine()
        ),
        pool=dict(
            root=osp.relpath(POOL, REPO),
            images=POOL_SIZE,
            seed=POOL_SEED,
            note='the calib split rendered with 256 images: ids 1-8 are data/miniworld/calib',
        ),
        plans={a: osp.relpath(p, REPO) for a, p in plans.items()},
        plan_budgets={a: json.load(open(p))['budget'] for a, p in plans.items()},
        old_vs_streamed_ranges=cached_range_ratios(args) if {'old', 'ranges'} & set(args.phases) else None,
        not_run=not_run,
        summary=summarize(rows),
        rows=rows,
    )
    common.write_json(args.out, report)
    write_tables(report, args)
    log(f'done; {args.out}')


def _files(root: str, suffix: str) -> list[str]:
    return [osp.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(suffix)]


if __name__ == '__main__':
    main()
