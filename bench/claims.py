"""Do LRP-QViT's two claims hold? A controlled test of LRP mixed precision and of CRL against RepQ.

    python bench/claims.py --dry-run                                   # the cells it would run
    python bench/claims.py --models classifier                         # the classifier's full grid
    python bench/claims.py --models mask_rcnn --sets 2 --random-methods crl --audit lrp_8img
    python bench/claims.py --tables-only                               # JSON + docs from the saved cells

The paper claims (1) LRP-guided mixed precision beats uniform bits at the same memory and (2) its
clipped reparameterization (CRL) beats RepQ-ViT's. Its own table compares MP4 with CRL against
W4A4 with RepQ, which mixes the two; here they are separated, and each mixed-precision plan is
held to a control:

* **cells**: every *plan* crossed with every *method* (``METHODS``: RepQ, CRL by default; MPTQ-ViT's
  SQ-b and CRL + OPT-m with ``--methods``; a further ``QuantConfig`` option is one more entry there) on each of ``--sets`` disjoint calibration sets;
* **plans at equal weight memory** (``Σ params·bits ≤`` uniform 4 bits over the backbone's sites):
  ``uniform`` (W4A4), ``lrp`` (the LRP plan of the Swin classifier, ``lrp_qvit`` allocator, 64 LRP
  images), ``sensitivity`` (the model's own measured-sensitivity plan on that calibration set),
  ``lampq`` (the same with LampQ's type-aware metric and one re-measure/re-solve iteration), and
  ``--seeds`` **random plans** (``mmdet_lrpq.plan.random_plan``): the LRP plan's sites, its bit
  choices and its histogram of bit-widths placed at random, weight memory between the LRP plan's
  minus 0.5 % and the budget. Where the LRP plan falls in their distribution (percentile of its
  mean among the random plans' means) says whether its choice of sites carries information;
* **plans at equal BOPs** (classifier; ``--budgets bops``): ``sensitivity_bops`` (the measured
  sensitivity under weight memory and BOPs ≤ uniform 4 bits') and ``random_bops`` plans (bits in
  {3, 4, 5}, weight memory and BOPs within 0.5 % under uniform 4 bits');
* **audit** (``--audit``): LRP variants that differ from ``lrp`` in one choice — ``lrp_8img`` (8 LRP
  images instead of 64), ``lrp_raw`` (raw scores, no per-type normalisation), ``lrp_ilp`` (relative
  importance through the ``ilp`` allocator instead of the paper's positional rule).

Models: ``classifier`` (the miniature world's Swin classifier, top-1 on its 400 classification val
images, calibration sets from its classification train split, Fisher sensitivity from the
cross-entropy) and the tiny detectors ``mask_rcnn`` / ``cascade_mask_rcnn`` (box/mask AP with
CocoMetric on the 200 val images, calibration sets from ``data/miniworld_calib_pool``, the
sensitivity plans of ``tools/sensitivity_plan.py`` in detector scope). On real weights:
``--classifier swin_tiny_patch4_window7_224 --classifier-checkpoint swin_t.pth --imagenet VAL_DIR
--imagenet-calib TRAIN_DIR`` and ``--config CFG --checkpoint DET.pth --coco-root COCO`` (``--device
cuda``); the detector is then named ``detector`` in ``--models``.

Every cell is saved as it finishes (``<work-dir>/runs/<model>/<tag>.json``, keyed by what it ran),
so an interrupted run resumes; ``results/claims.json`` and the block between
``<!-- claims:begin -->`` / ``<!-- claims:end -->`` of docs/benchmarks.md gather every saved cell,
with a verdict per claim computed from the numbers (``claim_verdicts``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import os.path as osp
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from mmdet_lrpq.plan.bitplan import json_safe

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
COMMAND = 'python bench/claims.py'
MARKERS = ('<!-- claims:begin -->', '<!-- claims:end -->')
DOC = osp.join('docs', 'benchmarks.md')
K = 4  # MP4 against W4A4
LEVELS = (K - 1, K, K + 1)

# The method axis: name -> QuantConfig options. Another reparameterization or quantizer option is one
# more entry here (e.g. 'crl_sqb': dict(method='crl', <option>=...)); cells, tables and claim 2 follow.
METHODS: dict[str, dict] = {
    'repq': dict(method='repq'),
    'crl': dict(method='crl'),
    # MPTQ-ViT's options (docs/method.md): SQ-b alone (it refuses RepQ), OPT-m on CRL
    'sqb': dict(method='none', smooth='sq-b'),
    'crl_optm': dict(method='crl', gelu_scales='opt-m'),
}
PAPER_METHODS = ('repq', 'crl')  # the default grid: the two reparameterizations the claims are about
PAPER_METHOD, BASELINE_METHOD = 'crl', 'repq'  # claim 2: PAPER_METHOD beats BASELINE_METHOD
LABELS = {
    'repq': 'RepQ',
    'crl': 'CRL',
    'sqb': 'SQ-b',
    'crl_optm': 'CRL + OPT-m',
}  # how the verdicts name a method (default: its key)

WEIGHT_PLANS = ('uniform', 'lrp', 'sensitivity', 'lampq')
BOPS_PLANS = ('sensitivity_bops',)
AUDIT = {
    'lrp_8img': 'LRP on 8 images instead of 64',
    'lrp_raw': 'raw LRP scores (no per-layer-type normalisation)',
    'lrp_ilp': "relative importance through the 'ilp' allocator instead of the paper's positional rule",
}
CONTROL_PERCENTILE = 90.0  # a plan "beats the random control" at or above this percentile
LRP_IMAGES, LRP_IMAGES_AUDIT = 64, 8

MINI = osp.join(REPO, 'data', 'miniworld')
MINI_POOL = osp.join(REPO, 'data', 'miniworld_calib_pool')
MINI_CKPT = osp.join(REPO, 'checkpoints', 'miniworld')
MINI_DETECTORS = {
    'mask_rcnn': ('configs/miniworld/mask_rcnn_swin_mini.py', osp.join(MINI_CKPT, 'mask_rcnn_swin_mini.pth')),
    'cascade_mask_rcnn': (
        'configs/miniworld/cascade_mask_rcnn_swin_mini.py',
        osp.join(MINI_CKPT, 'cascade_mask_rcnn_swin_mini.pth'),
    ),
}


# ------------------------------------------------------------------------------------------ cells
@dataclass(frozen=True)
class Cell:
    """One evaluation: a model quantized with a plan and a method, calibrated on one set."""

    model: str
    plan: str  # a WEIGHT_PLANS / BOPS_PLANS / AUDIT name, 'random' or 'random_bops'
    method: str
    set_index: int
    seed: int | None = None  # random plans

    @property
    def plan_name(self) -> str:
        return self.plan if self.seed is None else f'{self.plan}{self.seed}'

    @property
    def tag(self) -> str:
        return f'set{self.set_index}_{self.plan_name}_{self.method}'

    @property
    def family(self) -> str:
        if self.plan in AUDIT:
            return 'audit'
        return 'bops' if self.plan in BOPS_PLANS + ('random_bops',) else 'weight'


def grid(
    models: list[str],
    methods: list[str],
    random_methods: list[str],
    sets: list[int],
    seeds: int,
    budgets: list[str],
    audit: list[str],
    audit_methods: list[str],
) -> list[Cell]:
    """Every cell, set by set (a partial run covers whole sets): the plans, the random plans, the audit.

    The BOPs family runs on the classifier only (its sites' MACs are the classifier's)."""
    out = []
    for s in sets:
        for model in models:
            plans = list(WEIGHT_PLANS) + (list(BOPS_PLANS) if 'bops' in budgets and model == 'classifier' else [])
            out += [Cell(model, p, m, s) for p in plans for m in methods]
            out += [Cell(model, 'random', m, s, seed) for seed in range(seeds) for m in random_methods]
            if 'bops' in budgets and model == 'classifier':
                out += [Cell(model, 'random_bops', m, s, seed) for seed in range(seeds) for m in random_methods]
            out += [Cell(model, a, m, s) for a in audit for m in audit_methods]
    return out


# ------------------------------------------------------------------------------------- statistics
def percentile(value: float, distribution: list[float]) -> float:
    """Where ``value`` falls among ``distribution`` (0-100): the share below it, ties counted half."""
    if not distribution:
        return math.nan
    below = sum(1 for d in distribution if d < value)
    ties = sum(1 for d in distribution if d == value)
    return 100.0 * (below + 0.5 * ties) / len(distribution)


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int]:
    """(mean, standard error, n) of ``a[s] - b[s]`` over the sets both have (SE NaN below 2 sets)."""
    diffs = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    if not diffs:
        return math.nan, math.nan, 0
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return statistics.mean(diffs), se, len(diffs)


def measurable(mean: float, se: float, resolution: float) -> int:
    """+1 / -1 where a paired difference is clearly above / below zero (beyond 2 SE and the metric's
    resolution), else 0."""
    if math.isnan(mean) or math.isnan(se):
        return 0
    if mean > 2 * se and mean >= resolution:
        return 1
    if mean < -2 * se and mean <= -resolution:
        return -1
    return 0


def plan_verdict(
    plan: dict[int, float], uniform: dict[int, float], randoms: list[dict[int, float]], resolution: float
) -> dict:
    """Does ``plan`` beat uniform, and the random control? (set -> metric dicts, over common sets)."""
    sets = set(plan) & set(uniform)
    for r in randoms:
        sets &= set(r)
    diff, se, n = paired({s: plan[s] for s in sets}, {s: uniform[s] for s in sets})
    random_means = [statistics.mean(r[s] for s in sets) for r in randoms] if sets else []
    pct = percentile(statistics.mean(plan[s] for s in sets), random_means) if sets else math.nan
    vs_uniform = measurable(diff, se, resolution)
    beats_random = not math.isnan(pct) and pct >= CONTROL_PERCENTILE
    if vs_uniform > 0 and beats_random:
        verdict = 'holds'
    elif vs_uniform > 0 and not randoms:
        verdict = 'beats uniform; no random control run'
    elif vs_uniform > 0:
        verdict = 'not shown: beats uniform, but not the random plans'
    elif vs_uniform < 0:
        verdict = 'reversed: below uniform'
    else:
        verdict = 'not shown: no measurable difference from uniform'
    return dict(
        sets=n,
        diff=diff,
        se=se,
        percentile=pct,
        random_plans=len(randoms),
        beats_uniform=vs_uniform > 0,
        beats_random=beats_random,
        verdict=verdict,
    )


def method_verdict(pairs: list[tuple[float, float]], resolution: float) -> dict:
    """Claim 2 over (paper method, baseline method) metric pairs of the same plan and set."""
    diffs = [a - b for a, b in pairs]
    if not diffs:
        return dict(pairs=0, diff=math.nan, se=math.nan, ahead=0, verdict='not run')
    mean = statistics.mean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    sign = measurable(mean, se, resolution)
    verdict = {1: 'holds', -1: 'reversed: the baseline is ahead', 0: 'not shown: no measurable difference'}[sign]
    return dict(
        pairs=len(diffs),
        diff=mean,
        se=se,
        ahead=sum(d > 0 for d in diffs),
        behind=sum(d < 0 for d in diffs),
        verdict=verdict,
    )


# ------------------------------------------------------------------------------------- reporting
def metric_of(model: str) -> str:
    return 'top1' if model == 'classifier' else 'box_ap'


def by_set(rows: list[dict], model: str, plan: str, method: str) -> dict[int, float]:
    key = metric_of(model)
    return {r['set']: r[key] for r in rows if r['model'] == model and r['plan'] == plan and r['method'] == method}


def random_runs(rows: list[dict], model: str, family: str, method: str) -> list[dict[int, float]]:
    """One set -> metric dict per random seed of ``family`` ('random' / 'random_bops')."""
    key = metric_of(model)
    seeds: dict[int, dict[int, float]] = {}
    for r in rows:
        if r['model'] == model and r['plan'] == family and r['method'] == method:
            seeds.setdefault(r['seed'], {})[r['set']] = r[key]
    return [seeds[s] for s in sorted(seeds)]


def resolution_of(model: str, rows: list[dict]) -> float:
    """The smallest difference the metric can show: one image of top-1, 0.1 AP as printed."""
    n = next((r.get('eval_images') for r in rows if r['model'] == model and r.get('eval_images')), None)
    return 100.0 / n if model == 'classifier' and n else 0.1


def claim_verdicts(rows: list[dict]) -> list[dict]:
    """Every verdict, computed from the rows: claim 1 per model and method (the LRP plan, and the
    sensitivity plans as the variants it is compared with), claim 2 per model."""
    out = []
    for model in dict.fromkeys(r['model'] for r in rows if r['plan'] != 'float'):
        res = resolution_of(model, rows)
        methods = [m for m in dict.fromkeys(r['method'] for r in rows if r['model'] == model) if m]
        for method in methods:
            uniform = by_set(rows, model, 'uniform', method)
            for plan, family in (
                ('lrp', 'random'),
                ('sensitivity', 'random'),
                ('lampq', 'random'),
                ('sensitivity_bops', 'random_bops'),
                *((a, 'random') for a in AUDIT),
            ):
                values = by_set(rows, model, plan, method)
                randoms = random_runs(rows, model, family, method)
                if not values or not uniform:
                    continue
                v = plan_verdict(values, uniform, randoms, res)
                out.append(
                    dict(
                        claim=1 if plan == 'lrp' else 'variant',
                        model=model,
                        method=method,
                        plan=plan,
                        control=family,
                        **v,
                    )
                )
        pairs = []
        for plan in dict.fromkeys(r['plan'] for r in rows if r['model'] == model and r['plan'] != 'float'):
            seeds = {r.get('seed') for r in rows if r['model'] == model and r['plan'] == plan}
            for seed in seeds:
                a, b = (
                    {
                        r['set']: r[metric_of(model)]
                        for r in rows
                        if r['model'] == model and r['plan'] == plan and r.get('seed') == seed and r['method'] == m
                    }
                    for m in (PAPER_METHOD, BASELINE_METHOD)
                )
                pairs += [(a[s], b[s]) for s in sorted(set(a) & set(b))]
        out.append(
            dict(
                claim=2,
                model=model,
                method=f'{PAPER_METHOD} vs {BASELINE_METHOD}',
                plan='every plan',
                control='same plan and set',
                **method_verdict(pairs, res),
            )
        )
        lrp, uni = by_set(rows, model, 'lrp', PAPER_METHOD), by_set(rows, model, 'uniform', BASELINE_METHOD)
        if lrp and uni:
            d, se, n = paired(lrp, uni)
            out.append(
                dict(
                    claim="paper's table",
                    model=model,
                    method=f'lrp {PAPER_METHOD} vs uniform {BASELINE_METHOD}',
                    plan='lrp',
                    control='uniform, the other method',
                    diff=d,
                    se=se,
                    sets=n,
                    verdict={1: 'MP ahead', -1: 'MP behind', 0: 'no measurable difference'}[measurable(d, se, res)],
                )
            )
    return out


def _pm(values: list[float]) -> str:
    if not values:
        return '—'
    if len(values) == 1:
        return f'{values[0]:.1f}'
    return f'{statistics.mean(values):.1f} ± {statistics.pstdev(values):.1f}'


def _signed(v: float, se: float = math.nan) -> str:
    if math.isnan(v):
        return '—'
    return f'{round(v, 1) + 0.0:+.1f}' + ('' if math.isnan(se) else f' ± {se:.1f}')


# What each option is, as the side-by-side table names it: quantizer options at uniform 4 bits, planners
# (with the paper's method) at the LRP plan's weight memory.
SIDE_BY_SIDE = (
    ('repq', 'uniform', "RepQ-ViT's reparameterization", "method='repq'"),
    ('crl', 'uniform', "LRP-QViT's clipped reparameterization (CRL)", "method='crl' (default)"),
    ('sqb', 'uniform', "MPTQ-ViT's SQ-b (SmoothQuant with a bias term)", "method='none', smooth='sq-b'"),
    ('crl_optm', 'uniform', "MPTQ-ViT's OPT-m (region-wise post-GELU scales) on CRL", "gelu_scales='opt-m'"),
    ('crl', 'lrp', "LRP-QViT's plan (relevance, the paper's allocation rule)", 'tools/lrp_plan.py'),
    ('crl', 'sensitivity', 'measured Fisher sensitivity, one ILP', 'tools/sensitivity_plan.py'),
    (
        'crl',
        'lampq',
        "LampQ's type-aware metric, iterative ILP",
        'tools/sensitivity_plan.py --type-aware --iterations 1',
    ),
)


def methods_side_by_side(rows: list[dict]) -> list[str]:
    """One row per option (where any model ran it): its metric per model (mean ± std over the calibration
    sets) and the median seconds a cell spent calibrating and quantizing (planning time not included): over
    every cell of a quantizer option (it costs the same under any plan), over the plan's cells of a planner."""
    models = list(dict.fromkeys(r['model'] for r in rows))
    label = {m: 'top-1 %' if m == 'classifier' else 'box AP' for m in models}
    table = []
    for method, plan, what, how in SIDE_BY_SIDE:
        per_model = [
            [r for r in rows if r['model'] == m and r['method'] == method and r['plan'] == plan] for m in models
        ]
        if not any(per_model):
            continue
        value = [_pm([r[metric_of(m)] for r in cells]) for m, cells in zip(models, per_model)]
        # a quantizer option costs the same whatever the plan: its cost is the median over all its cells
        timed = [
            [r for r in rows if r['model'] == m and r['method'] == method and r['plan'] != 'float']
            if plan == 'uniform'
            else cells
            for m, cells in zip(models, per_model)
        ]
        seconds = [[r['quant_seconds'] for r in cells if r.get('quant_seconds') is not None] for cells in timed]
        cost = [f'{statistics.median(t):.1f}' if t else '—' for t in seconds]
        table.append(f'| {what} | `{how}` | {plan} | ' + ' | '.join(value) + ' | ' + ' / '.join(cost) + ' |')
    if not table:
        return []
    return [
        "**Methods side by side** (quantizer options at uniform W4A4; planners at the LRP plan's weight memory "
        f'with {LABELS[PAPER_METHOD]}; calibration s: the median seconds a cell spent calibrating and quantizing, '
        "models in the order of the columns, over every cell of a quantizer option and the plan's cells of a "
        'planner; planning not included)',
        '',
        '| option | how | plan | ' + ' | '.join(f'{m} {label[m]}' for m in models) + ' | calibration s |',
        '|---|---|---|' + '---|' * len(models) + '---|',
        *table,
        '',
    ]


def tables(rows: list[dict], context: dict | None = None) -> str:
    """The markdown of the docs block, from the rows alone (and the run's description)."""
    context = context or {}
    verdicts = claim_verdicts(rows)
    out = []
    for model in dict.fromkeys(r['model'] for r in rows):
        mine = [r for r in rows if r['model'] == model]
        key = metric_of(model)
        label = 'top-1 %' if model == 'classifier' else 'box AP'
        fp = next((r for r in mine if r['plan'] == 'float'), None)
        quant = [r for r in mine if r['plan'] != 'float']
        sets = sorted({r['set'] for r in quant})
        sizes = sorted({r.get('set_size') for r in quant if r.get('set_size')})
        head = (
            f'**{model}: {label}, mean ± std over {len(sets)} calibration set(s) of '
            f'{"/".join(map(str, sizes)) or "?"} images**'
        )
        if fp:
            head += f' — float {fp[key]:.1f}' + (f' / {fp["mask_ap"]:.1f} mask' if 'mask_ap' in fp else '')
            if fp.get('eval_images'):
                head += f' ({fp["eval_images"]} evaluation images)'
        out += [
            head,
            '',
            f'| plan | budget | method | {label} | '
            + ('mask AP | ' if key == 'box_ap' else '')
            + 'vs uniform (same method, ± SE over sets) | percentile among random plans | avg W bits | avg A bits '
            '| weight MB | GBOPs |',
            '|---|---|---|---|' + ('---|' if key == 'box_ap' else '') + '---|---|---|---|---|---|',
        ]
        plans = list(dict.fromkeys(r['plan'] for r in quant))
        order = [p for p in WEIGHT_PLANS + ('random',) + BOPS_PLANS + ('random_bops',) + tuple(AUDIT) if p in plans]
        methods = [m for m in METHODS if any(r['method'] == m for r in quant)] + [
            m for m in dict.fromkeys(r['method'] for r in quant) if m not in METHODS
        ]
        for plan in order:
            for method in methods:
                cells = [r for r in quant if r['plan'] == plan and r['method'] == method]
                if not cells:
                    continue
                family = 'random_bops' if plan in BOPS_PLANS + ('random_bops',) else 'random'
                budget = 'BOPs + memory' if family == 'random_bops' else 'weight memory'
                if plan == 'uniform':
                    budget = '(reference)'
                if plan.startswith('random'):
                    per_seed = random_runs(rows, model, plan, method)
                    means = [statistics.mean(v.values()) for v in per_seed]
                    value = (
                        f'{statistics.mean(means):.1f} ± {statistics.pstdev(means):.1f} over {len(means)} '
                        f'plans ({min(means):.1f}–{max(means):.1f})'
                    )
                    mask = (
                        _pm(
                            [
                                statistics.mean(r['mask_ap'] for r in cells if r['seed'] == s)
                                for s in sorted({r['seed'] for r in cells})
                            ]
                        )
                        if key == 'box_ap'
                        else ''
                    )
                    vs = _signed(
                        *paired(
                            {
                                s: statistics.mean(v[s] for v in per_seed if s in v)
                                for s in sets
                                if any(s in v for v in per_seed)
                            },
                            by_set(rows, model, 'uniform', method),
                        )[:2]
                    )
                    pct = '(the control)'
                else:
                    value = _pm([r[key] for r in cells])
                    mask = _pm([r['mask_ap'] for r in cells]) if key == 'box_ap' else ''
                    v = next(
                        (
                            v
                            for v in verdicts
                            if v['model'] == model
                            and v.get('plan') == plan
                            and v['method'] == method
                            and v['claim'] in (1, 'variant')
                        ),
                        None,
                    )
                    if plan == 'uniform':
                        vs, pct = '—', '—'
                    else:
                        d = paired(by_set(rows, model, plan, method), by_set(rows, model, 'uniform', method))
                        vs = _signed(d[0], d[1])
                        pct = '—' if v is None or math.isnan(v['percentile']) else f'{v["percentile"]:.0f}'
                out.append(
                    f'| {plan} | {budget} | {method} | {value} | '
                    + (f'{mask} | ' if key == 'box_ap' else '')
                    + f'{vs} | {pct} | {statistics.mean(r["avg_w_bits"] for r in cells):.3f} | '
                    f'{statistics.mean(r["avg_a_bits"] for r in cells):.2f} | '
                    f'{statistics.mean(r["weight_mb"] for r in cells):.3f} | '
                    f'{statistics.mean(r["gbops"] for r in cells):.2f} |'
                )
        out.append('')
    out += methods_side_by_side(rows)
    out += [
        '**Verdicts** (computed by `claim_verdicts` from the rows above: "beats uniform" = the paired '
        "difference over the calibration sets is above 2 standard errors and the metric's resolution; "
        f'"beats the random plans" = at or above their {CONTROL_PERCENTILE:.0f}th percentile)',
        '',
        '| claim | model | comparison | difference (± SE) | percentile among random plans | verdict |',
        '|---|---|---|---|---|---|',
    ]
    for v in verdicts:
        if v['claim'] == 1:
            what, claim = f'lrp vs uniform, both {v["method"]}', '1: LRP mixed precision beats uniform'
        elif v['claim'] == 'variant':
            what, claim = f'{v["plan"]} vs uniform, both {v["method"]}', '(variant)'
        elif v['claim'] == 2:
            what = (
                f'{v["method"]}, {v["pairs"]} (plan, set) pairs: ahead in {v["ahead"]}, behind in {v.get("behind", 0)}'
            )
            claim = f'2: {LABELS.get(PAPER_METHOD, PAPER_METHOD)} beats {LABELS.get(BASELINE_METHOD, BASELINE_METHOD)}'
        else:
            what, claim = v['method'], "the paper's comparison (confounded)"
        pct = v.get('percentile', math.nan)
        where = '—' if math.isnan(pct) else f'{pct:.0f} (of {v["random_plans"]})'
        out.append(f'| {claim} | {v["model"]} | {what} | {_signed(v["diff"], v["se"])} | {where} | {v["verdict"]} |')
    if context.get('grid'):
        out += ['', 'Run: ' + '; '.join(f'`{c}`' for c in context['grid']) + '.']
    return '\n'.join(out) + '\n'


# ------------------------------------------------------------------------------------- the world
def _quiet(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f'{what} failed ({" ".join(cmd[1:])}):\n{proc.stderr[-3000:]}')
    return proc.stdout


class Classifier:
    """The Swin classifier, its evaluation images (loaded once) and its calibration sets."""

    def __init__(self, args, log):
        import torch

        from mmdet_lrpq.cli import labelled_items
        from mmdet_lrpq.lrp import eval_transform, iter_batches

        self.args = args
        self.model = build_classifier(args.classifier, args.classifier_checkpoint).to(args.device).eval()
        transform = eval_transform(self.model)
        self.items = labelled_items(args.imagenet, args.imagenet_labels)
        calib_items = labelled_items(args.imagenet_calib, args.imagenet_calib_labels)
        if osp.abspath(args.imagenet_calib) == osp.abspath(args.imagenet):  # never evaluate on calibration images
            calib_items, self.items = (
                self.items[: args.sets * args.cls_set_size],
                self.items[args.sets * args.cls_set_size :],
            )
        if len(calib_items) < args.sets * args.cls_set_size:
            raise ValueError(
                f'{args.sets} sets of {args.cls_set_size} need {args.sets * args.cls_set_size} '
                f'calibration images; {args.imagenet_calib} has {len(calib_items)}'
            )
        self.sets = [calib_items[i * args.cls_set_size : (i + 1) * args.cls_set_size] for i in range(args.sets)]
        self.transform = transform
        self.batches = None
        if len(self.items) <= 2000:  # small enough to hold decoded: every cell reuses them
            self.batches = [(x, torch.tensor([i.label for i in b])) for x, b in iter_batches(self.items, transform, 50)]
        log(f'classifier: {len(self.items)} evaluation images, {args.sets} calibration sets of {args.cls_set_size}')

    def images(self, s: int):
        import torch

        from mmdet_lrpq.lrp import iter_batches

        return [(x, torch.tensor([i.label for i in b])) for x, b in iter_batches(self.sets[s], self.transform, 1)]

    def top1(self, model) -> float:
        import torch

        from mmdet_lrpq.lrp import iter_batches

        batches = self.batches or (
            (x, torch.tensor([i.label for i in b])) for x, b in iter_batches(self.items, self.transform, 50)
        )
        correct = 0
        with torch.no_grad():
            for x, y in batches:
                correct += int((model(x.to(self.args.device)).argmax(1).cpu() == y).sum())
        return 100.0 * correct / len(self.items)

    def calib_ids(self, s: int) -> list[str]:
        return [osp.relpath(str(i.path), self.args.imagenet_calib) for i in self.sets[s]]

    def run(self, options: dict, s: int) -> tuple[dict, dict]:
        from mmdet_lrpq import QuantConfig, quantize_

        model = copy.deepcopy(self.model)
        t0 = time.time()
        report = quantize_(model, QuantConfig(**options), calib=[x.to(self.args.device) for x, _ in self.images(s)])
        t1 = time.time()
        top1 = self.top1(model)
        return {'top1': top1, 'eval_images': len(self.items)}, dict(
            report.totals, quant_seconds=round(t1 - t0, 1), eval_seconds=round(time.time() - t1, 1)
        )


def build_classifier(name: str, checkpoint: str):
    """The classifier as the tools build it (:func:`mmdet_lrpq.cli.build_classifier`): a timm Swin name or a
    checkpoint recording its kwargs, with ``checkpoint``'s weights (every key must fit)."""
    from mmdet_lrpq.cli import build_classifier as build

    return build(argparse.Namespace(model=name, checkpoint=checkpoint, pretrained=False, random_init=None))[0]


class Detector:
    """A detector built once (deep-copied per cell), its val loader and evaluator, its calibration sets."""

    def __init__(self, name: str, args, log):
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        from mmengine.config import Config
        from mmengine.evaluator import Evaluator
        from mmengine.runner import Runner, load_checkpoint

        import mmdet_lrpq

        register_all_modules(init_default_scope=True)
        mmdet_lrpq.register_all_modules()
        self.name, self.args = name, args
        if name == 'detector':
            self.config, self.checkpoint = args.config, args.checkpoint
            root = args.coco_root.rstrip('/') + '/'
            ann = root + 'annotations/instances_val2017.json'
        else:
            self.config, self.checkpoint = MINI_DETECTORS[name]
            root, ann = MINI + '/', MINI + '/annotations/instances_val.json'
        cfg = Config.fromfile(osp.join(REPO, self.config))
        cfg.test_dataloader.dataset.data_root = root
        cfg.test_evaluator.ann_file = ann
        cfg.test_dataloader.num_workers = 0
        cfg.test_dataloader.persistent_workers = False
        self.cfg = cfg
        self.model = MODELS.build(cfg.model)
        load_checkpoint(self.model, self.checkpoint, map_location='cpu', logger='silent')
        self.model.cfg = cfg
        self.model.to(args.device).eval()
        self.loader = Runner.build_dataloader(cfg.test_dataloader)
        self.evaluator = Evaluator(cfg.test_evaluator)
        self.evaluator.dataset_meta = self.loader.dataset.metainfo
        log(
            f'{name}: {len(self.loader.dataset)} evaluation images, {args.sets} calibration sets of {args.det_set_size}'
        )

    def calib(self, s: int) -> dict:
        """The hook's calib options of set ``s``: disjoint slices of the miniature world's pool, or
        ``train2017`` images drawn with seed ``s`` on real COCO."""
        if self.name == 'detector':
            return dict(source='train', num_images=self.args.det_set_size, seed=s)
        n = self.args.det_set_size
        return dict(
            data_root=MINI_POOL + '/',
            ann_file='annotations/instances_calib.json',
            img_prefix='calib/',
            image_ids=list(range(s * n + 1, (s + 1) * n + 1)),
        )

    def calib_ids(self, s: int):
        return self.calib(s).get('image_ids') or self.calib(s)

    def evaluate(self, model) -> dict:
        import torch

        with torch.no_grad():
            for data in self.loader:
                self.evaluator.process(data_samples=model.test_step(data), data_batch=data)
        m = self.evaluator.evaluate(len(self.loader.dataset))
        return {
            'box_ap': 100 * m['coco/bbox_mAP'],
            'mask_ap': 100 * m.get('coco/segm_mAP', math.nan),
            'eval_images': len(self.loader.dataset),
        }

    def run(self, options: dict, s: int) -> tuple[dict, dict]:
        from mmdet_lrpq.config import QuantConfig
        from mmdet_lrpq.engine.calib_data import CalibSettings
        from mmdet_lrpq.engine.quantize import quantize_detector

        model = copy.deepcopy(self.model)
        t0 = time.time()
        report = quantize_detector(
            model,
            self.cfg,
            QuantConfig(**options),
            CalibSettings.from_options(self.calib(s)),
            progress=False,
            logger=logging.getLogger('claims'),
        )
        t1 = time.time()
        return self.evaluate(model), dict(
            report.totals, quant_seconds=round(t1 - t0, 1), eval_seconds=round(time.time() - t1, 1)
        )


# ------------------------------------------------------------------------------------------ plans
class Plans:
    """Every plan file a cell needs, made once and kept under ``<work-dir>/plans``."""

    def __init__(self, args, log):
        self.args, self.log = args, log
        self.dir = osp.join(args.work_dir, 'plans')
        os.makedirs(self.dir, exist_ok=True)
        self._classifier = None
        self._sites = None

    # the classifier and its sites in the detector's names (the names every LRP plan uses)
    @property
    def classifier(self):
        if self._classifier is None:
            self._classifier = build_classifier(self.args.classifier, self.args.classifier_checkpoint).eval()
        return self._classifier

    def sites(self, named: str = 'mmdet'):
        from dataclasses import replace

        from mmdet_lrpq.models.swin_names import swin_name_to_mmdet
        from mmdet_lrpq.models.timm_swin import swin_sites

        if self._sites is None:  # counting their MACs takes a forward of a copy of the classifier: once
            self._sites = swin_sites(self.classifier)
        if named == 'timm':
            return self._sites
        return [replace(s, name='backbone.' + swin_name_to_mmdet(s.name, 'timm')) for s in self._sites]

    def _to_detector(self, plan, lrp):
        """A timm-named classifier plan as the detector-named plan the LRP tool writes."""
        from mmdet_lrpq.models.swin_names import swin_name_to_mmdet

        out = plan.rename(lambda n: 'backbone.' + swin_name_to_mmdet(n, 'timm')).with_default(K, K)
        out.architecture = lrp.architecture
        return out

    def _plan_tool_options(self, out: str) -> list[str]:
        """What every planning tool this benchmark runs is given: MP4, the plan file, the device."""
        return ['--target', f'mp{K}', '--out', out, '--no-progress', '--device', self.args.device]

    def lrp(self, images: int = LRP_IMAGES) -> str:
        out = osp.join(self.dir, f'lrp_{images}img.json')
        if not osp.isfile(out):
            t0 = time.time()
            _quiet(
                [
                    sys.executable,
                    osp.join(REPO, 'tools', 'lrp_plan.py'),
                    '--model',
                    self.args.classifier,
                    '--checkpoint',
                    self.args.classifier_checkpoint,
                    '--images',
                    self.args.lrp_images,
                    '--num-images',
                    str(images),
                    *self._plan_tool_options(out),
                ],
                'tools/lrp_plan.py',
            )
            self.log(f'LRP plan on {images} images [{time.time() - t0:.0f}s]')
        return out

    def lrp_variant(self, name: str) -> str:
        """``lrp_raw`` / ``lrp_ilp`` from the cached scores of the 64-image plan."""
        from mmdet_lrpq.lrp import relative_importance
        from mmdet_lrpq.plan import BitPlan, allocate

        out = osp.join(self.dir, f'{name}.json')
        if not osp.isfile(out):
            source = self.lrp()
            lrp = BitPlan.load(source)
            raw = json.load(open(source + '.scores.json'))['scores']
            scores, allocator = (raw, 'lrp_qvit') if name == 'lrp_raw' else (relative_importance(raw), 'ilp')
            plan = self._to_detector(allocate(allocator, self.sites('timm'), scores, target_bits=K), lrp)
            plan.source = {'variant_of': osp.relpath(source, REPO), 'audit': AUDIT[name]}
            plan.command = f'{COMMAND} --audit {name}'
            plan.save(out)
        return out

    def random(self, seed: int, bops: bool = False) -> str:
        """A random plan controlling for the LRP plan (weight memory), or for uniform 4 bits under a
        weight and a BOPs budget (``bops``)."""
        from mmdet_lrpq.plan import BitPlan, Budget, random_plan, uniform_bops

        out = osp.join(self.dir, f'random{"_bops" if bops else ""}_{seed}.json')
        if not osp.isfile(out):
            lrp = BitPlan.load(self.lrp())
            sites = self.sites()
            if bops:  # weights drawn from the MP4 choices; matmuls by the allocators' shared rule (the LRP plan's)
                like = {s.name: (K, K) if s.has_weights else lrp.resolve([s])[s.name] for s in sites}
                budget = Budget(weight_bits=K, max_bops=uniform_bops(sites, K))
                plan = random_plan(
                    sites,
                    like,
                    budget=budget,
                    seed=seed,
                    levels=LEVELS,
                    match_counts=False,
                    movable=[s.name for s in sites if s.has_weights],
                )
            else:
                like = lrp.resolve(sites)
                plan = random_plan(
                    sites,
                    like,
                    budget=Budget(weight_bits=K),
                    seed=seed,
                    movable=[s.name for s in sites if s.has_weights and s.name in lrp.scores],
                )
            plan = plan.with_default(K, K)
            plan.architecture = lrp.architecture
            plan.source = {
                'controls_for': 'uniform 4 bits (BOPs and weight memory)' if bops else osp.relpath(self.lrp(), REPO),
                'seed': seed,
            }
            plan.command = f'{COMMAND} (mmdet_lrpq.plan.random_plan, seed {seed})'
            plan.save(out)
        return out

    # measured-sensitivity plans of the classifier (Fisher proxy of its cross-entropy)
    def classifier_sensitivity(self, name: str, s: int, data: Classifier) -> str:
        out = osp.join(self.dir, f'classifier_set{s}_{name}.json')
        if osp.isfile(out):
            return out
        import torch
        import torch.nn.functional as F

        from mmdet_lrpq.models.fisher import fisher_sensitivity
        from mmdet_lrpq.plan import BitPlan, Budget, allocate, allocate_lampq, uniform_bops

        t0 = time.time()
        model = copy.deepcopy(data.model)
        sites = self.sites('timm')
        per_channel = frozenset(x.name for x in sites if x.name.endswith(('attn.qkv', 'mlp.fc1', 'reduction')))
        images = data.images(s)

        def measure(assignment=None):
            return fisher_sensitivity(
                model,
                sites,
                list(LEVELS),
                images,
                lambda m, batch: F.cross_entropy(m(batch[0].to(self.args.device)), batch[1].to(self.args.device)),
                per_channel_inputs=per_channel,
                assignment=assignment,
            )

        cache = osp.join(self.dir, f'classifier_set{s}_fisher.json')
        if osp.isfile(cache):
            table = {n: {int(b): c for b, c in v.items()} for n, v in json.load(open(cache)).items()}
        else:
            with torch.enable_grad():
                table = measure()
            json.dump(table, open(cache, 'w'), indent=1)
        if name == 'sensitivity':
            plan = allocate('sensitivity', sites, sensitivity=table, target_bits=K)
        elif name == 'sensitivity_bops':
            plan = allocate(
                'sensitivity',
                sites,
                sensitivity=table,
                target_bits=K,
                budget=Budget(weight_bits=K, max_bops=uniform_bops(sites, K)),
            )
        else:  # lampq: the type-aware metric and one re-measure / re-solve iteration
            with torch.enable_grad():
                plan = allocate_lampq(sites, table, target_bits=K, type_aware=True, iterations=1, measure=measure)
        plan = self._to_detector(plan, BitPlan.load(self.lrp()))
        plan.source = {
            **plan.source,
            'calibration_images': data.calib_ids(s),
            'measure': 'fisher-diagonal of the cross-entropy on the calibration set',
        }
        plan.command = f'{COMMAND} --models classifier (plan {name}, set {s})'
        plan.save(out)
        self.log(f'classifier plan {name} set {s} [{time.time() - t0:.0f}s]')
        return out

    def detector_sensitivity(self, name: str, s: int, det: Detector) -> str:
        out = osp.join(self.dir, f'{det.name}_set{s}_{name}.json')
        if osp.isfile(out):
            return out
        calib = det.calib(s)
        argv = [
            sys.executable,
            osp.join(REPO, 'tools', 'sensitivity_plan.py'),
            osp.join(REPO, det.config),
            det.checkpoint,
            *self._plan_tool_options(out),
            '--scores-cache',
            osp.join(self.dir, f'{det.name}_set{s}_fisher.json'),
            '--method',
            PAPER_METHOD,
            '--calib',
            *(f'{k}={json.dumps(v).replace(" ", "") if isinstance(v, list) else v}' for k, v in calib.items()),
        ]
        if det.name == 'detector':
            argv += ['--cfg-options', f'test_dataloader.dataset.data_root={det.cfg.test_dataloader.dataset.data_root}']
        if name == 'lampq':
            argv += ['--type-aware', '--iterations', '1']
        t0 = time.time()
        _quiet(argv, 'tools/sensitivity_plan.py')
        self.log(f'{det.name} plan {name} set {s} [{time.time() - t0:.0f}s]')
        return out

    def path(self, cell: Cell, world) -> str | None:
        if cell.plan == 'uniform':
            return None
        if cell.plan == 'lrp':
            return self.lrp()
        if cell.plan == 'lrp_8img':
            return self.lrp(LRP_IMAGES_AUDIT)
        if cell.plan in ('lrp_raw', 'lrp_ilp'):
            return self.lrp_variant(cell.plan)
        if cell.plan in ('random', 'random_bops'):
            return self.random(cell.seed, bops=cell.plan == 'random_bops')
        if cell.model == 'classifier':
            return self.classifier_sensitivity(cell.plan, cell.set_index, world)
        return self.detector_sensitivity(cell.plan, cell.set_index, world)


# ------------------------------------------------------------------------------------------- runs
def run_cell(cell: Cell, world, plans: Plans, args, log) -> dict:
    """Quantize a copy of the model as the cell says and evaluate it (or read the saved result)."""
    from mmdet_lrpq.plan import BitPlan

    plan = plans.path(cell, world)
    options = dict(METHODS[cell.method], **({'plan': plan} if plan else {'w_bits': K, 'a_bits': K}))
    key = {
        'cell': cell.tag,
        'model': cell.model,
        'method_options': METHODS[cell.method],
        'plan_sha256': BitPlan.load(plan).content_hash() if plan else f'uniform {K}',
        'calibration': world.calib_ids(cell.set_index),
    }
    path = osp.join(args.work_dir, 'runs', cell.model, cell.tag + '.json')
    if osp.isfile(path):
        saved = json.load(open(path))
        if saved.get('key') == key:
            return saved['row']
    metrics, totals = world.run(options, cell.set_index)
    row = {
        'model': cell.model,
        'plan': cell.plan,
        'method': cell.method,
        'set': cell.set_index,
        'seed': cell.seed,
        'family': cell.family,
        **metrics,
        'set_size': args.cls_set_size if cell.model == 'classifier' else args.det_set_size,
        'avg_w_bits': totals['avg_weight_bits'],
        'avg_a_bits': totals['avg_act_bits'],
        'weight_mb': totals['weight_mb'],
        'weight_bits': totals['total_weight_bits'],
        'gbops': totals['bops'] / 1e9,
        'quant_seconds': totals['quant_seconds'],
        'eval_seconds': totals['eval_seconds'],
        'plan_file': osp.relpath(plan, REPO) if plan else None,
    }
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump({'key': key, 'row': row}, f, indent=1)
    os.replace(path + '.tmp', path)
    value = row['top1'] if cell.model == 'classifier' else row['box_ap']
    log(f'{cell.model:12s} {cell.tag:34s} {value:5.1f} ({row["quant_seconds"]:.0f}s + {row["eval_seconds"]:.0f}s)')
    return row


def float_row(model: str, world, args, log) -> dict:
    path = osp.join(args.work_dir, 'runs', model, 'float.json')
    if osp.isfile(path):
        return json.load(open(path))
    t0 = time.time()
    metrics = (
        world.evaluate(world.model)
        if model != 'classifier'
        else {'top1': world.top1(world.model), 'eval_images': len(world.items)}
    )
    row = {
        'model': model,
        'plan': 'float',
        'method': None,
        'set': None,
        'seed': None,
        'family': 'float',
        **metrics,
        'eval_seconds': round(time.time() - t0, 1),
    }
    os.makedirs(osp.dirname(path), exist_ok=True)
    json.dump(row, open(path, 'w'), indent=1)
    log(f'{model:12s} float {metrics.get("top1", metrics.get("box_ap")):.1f}')
    return row


def saved_rows(work_dir: str) -> list[dict]:
    rows = []
    runs = osp.join(work_dir, 'runs')
    for model in sorted(os.listdir(runs)) if osp.isdir(runs) else []:
        for name in sorted(os.listdir(osp.join(runs, model))):
            if name.endswith('.json'):
                data = json.load(open(osp.join(runs, model, name)))
                rows.append(data.get('row', data))
    return rows


def row_key(row: dict) -> tuple:
    """What identifies a cell's row: model, plan, method, calibration set, random seed."""
    return row['model'], row['plan'], row['method'], row.get('set'), row.get('seed')


def with_published(rows: list[dict], commands: list[str], out: str) -> tuple[list[dict], list[str]]:
    """``rows`` plus the rows of the results file ``out`` that no saved cell replaces, and the grid commands
    of both: a run in a fresh work dir (or --tables-only without one) adds to the published results instead
    of rewriting them with its own cells alone."""
    if not osp.isfile(out):
        return rows, commands
    published = json.load(open(out))
    mine = {row_key(r) for r in rows}
    kept = [r for r in published.get('rows', []) if row_key(r) not in mine]
    return kept + rows, list(dict.fromkeys([*published.get('grid', []), *commands]))


def write_report(rows: list[dict], grid_commands: list[str], args) -> None:
    try:
        from bench.common import publish
    except ImportError:  # run as a script: bench/ is sys.path[0]
        from common import publish

    context = {'grid': grid_commands}
    report = dict(
        command=COMMAND,
        grid=grid_commands,
        methods=METHODS,
        k=K,
        control_percentile=CONTROL_PERCENTILE,
        environment=dict(python=platform.python_version(), machine=platform.machine()),
        verdicts=claim_verdicts(rows),
        rows=rows,
    )
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(json_safe(report), f, indent=1, allow_nan=False)
    publish(tables(rows, context), osp.join(REPO, DOC), MARKERS, COMMAND, update=not args.no_doc)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument(
        '--models',
        nargs='+',
        default=['classifier', 'mask_rcnn'],
        choices=['classifier', *MINI_DETECTORS, 'detector'],
        help="'detector' is --config/--checkpoint on --coco-root",
    )
    p.add_argument(
        '--methods',
        nargs='+',
        default=list(PAPER_METHODS),
        choices=list(METHODS),
        help="methods crossed with every plan (default: RepQ and CRL; sqb and crl_optm are MPTQ-ViT's options)",
    )
    p.add_argument(
        '--random-methods',
        nargs='+',
        default=None,
        choices=list(METHODS),
        help='methods of the random-plan cells (default: --methods)',
    )
    p.add_argument('--sets', type=int, default=3, help='disjoint calibration sets')
    p.add_argument('--only-sets', type=int, nargs='+', default=None, help='run only these set indices')
    p.add_argument('--cls-set-size', type=int, default=8, help='images per classifier calibration set')
    p.add_argument('--det-set-size', type=int, default=16, help='images per detector calibration set')
    p.add_argument('--seeds', type=int, default=8, help='random plans per family')
    p.add_argument('--budgets', nargs='+', default=['weight', 'bops'], choices=['weight', 'bops'])
    p.add_argument('--audit', nargs='*', default=list(AUDIT), choices=list(AUDIT), help='LRP variants to measure')
    p.add_argument('--audit-methods', nargs='+', default=[PAPER_METHOD], choices=list(METHODS))
    # real weights
    p.add_argument(
        '--classifier',
        default=osp.join(MINI_CKPT, 'swin_mini_cls.pth'),
        help="timm Swin name, or a checkpoint recording its kwargs (default: the miniature world's)",
    )
    p.add_argument('--classifier-checkpoint', default=None, help='its weights (default: --classifier)')
    p.add_argument('--imagenet', default=osp.join(MINI, 'cls_val'), help='classifier evaluation images')
    p.add_argument('--imagenet-labels', default=None, help="'<path> <label>' lines (default: class folders)")
    p.add_argument(
        '--imagenet-calib',
        default=osp.join(MINI, 'cls_train'),
        help='classifier calibration images (with another --imagenet: the first images of it, not evaluated)',
    )
    p.add_argument('--imagenet-calib-labels', default=None)
    p.add_argument('--lrp-images', default=None, help='LRP images (default: --imagenet)')
    p.add_argument('--config', default=None, help="detector config of the 'detector' model")
    p.add_argument('--checkpoint', default=None, help='its float checkpoint')
    p.add_argument('--coco-root', default=None, help='COCO root (val2017 evaluated, train2017 calibrates)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=1, help='torch threads')
    p.add_argument('--work-dir', default=osp.join(REPO, 'work_dirs', 'claims'))
    p.add_argument('--out', default=osp.join(REPO, 'results', 'claims.json'))
    p.add_argument('--no-doc', action='store_true')
    p.add_argument('--dry-run', action='store_true', help='print the cells and exit')
    p.add_argument('--tables-only', action='store_true', help='rewrite JSON and docs from the saved cells')
    args = p.parse_args(argv)
    args.random_methods = args.random_methods or args.methods
    args.classifier_checkpoint = args.classifier_checkpoint or args.classifier
    mini_cls = args.imagenet == osp.join(MINI, 'cls_val')
    if mini_cls:
        args.imagenet_labels = args.imagenet_labels or osp.join(MINI, 'annotations', 'cls_val.txt')
    if not mini_cls and args.imagenet_calib == osp.join(MINI, 'cls_train'):
        args.imagenet_calib = args.imagenet  # real images: calibrate on the first ones, not evaluated
    if args.imagenet_calib == osp.join(MINI, 'cls_train'):
        args.imagenet_calib_labels = args.imagenet_calib_labels or osp.join(MINI, 'annotations', 'cls_train.txt')
    args.lrp_images = args.lrp_images or args.imagenet
    if 'detector' in args.models and not (args.config and args.checkpoint and args.coco_root):
        p.error('--models detector needs --config, --checkpoint and --coco-root')
    return args


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    start = time.time()
    log = lambda msg: print(f'[{time.time() - start:6.0f}s] {msg}', flush=True)  # noqa: E731
    history = osp.join(args.work_dir, 'commands.json')
    commands = json.load(open(history)) if osp.isfile(history) else []
    if args.tables_only:
        return write_report(*with_published(saved_rows(args.work_dir), commands, args.out), args)
    sets = args.only_sets if args.only_sets is not None else list(range(args.sets))
    cells = grid(
        args.models, args.methods, args.random_methods, sets, args.seeds, args.budgets, args.audit, args.audit_methods
    )
    if args.dry_run:
        for c in cells:
            print(f'{c.model:12s} set {c.set_index}  {c.family:6s}  {c.plan_name:18s} {c.method}')
        counts = {m: sum(c.model == m for c in cells) for m in args.models}
        print(f'{len(cells)} cells: ' + ', '.join(f'{m} {n}' for m, n in counts.items()))
        return
    import torch

    torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)
    command = ' '.join([COMMAND, *(a for a in argv if a not in ('--no-doc', '--tables-only'))])
    if command not in commands:
        json.dump(commands + [command], open(history, 'w'), indent=1)
    plans = Plans(args, log)
    for model in args.models:
        world = Classifier(args, log) if model == 'classifier' else Detector(model, args, log)
        float_row(model, world, args, log)
        for cell in (c for c in cells if c.model == model):
            run_cell(cell, world, plans, args, log)
        del world
    write_report(*with_published(saved_rows(args.work_dir), json.load(open(history)), args.out), args)
    log(f'done; {args.out}')


if __name__ == '__main__':
    main()
