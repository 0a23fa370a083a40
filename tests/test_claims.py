"""The claims benchmark's control and reporting: the random-plan generator (same sites, bit set,
histogram and budget as the plan it controls for; deterministic per seed), the percentile and
verdict logic, and the committed docs block equal to what the committed results give."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest

from mmdet_lrpq.plan import Budget, Site, account, allocate, random_plan, uniform_bops

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def claims():
    spec = importlib.util.spec_from_file_location('claims', REPO / 'bench' / 'claims.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules['claims'] = module
    spec.loader.exec_module(module)
    return module


def _sites() -> list[Site]:
    """Two stages of a toy Swin: weighted sites of several sizes, matmuls, MACs for BOPs."""
    out = []
    for block, (stage, width) in enumerate([(0, 8), (0, 8), (1, 16), (1, 16), (1, 16)]):
        p = f'b{block}'
        tokens = 64 if stage == 0 else 16
        out += [
            Site(f'{p}.qkv', 'linear', 'qkv', block, stage, 3 * width * width, tokens * 3 * width * width),
            Site(f'{p}.matmul1', 'matmul', 'matmul1', block, stage, 0, tokens * 16 * width),
            Site(f'{p}.proj', 'linear', 'proj', block, stage, width * width, tokens * width * width),
            Site(f'{p}.fc1', 'linear', 'fc1', block, stage, 4 * width * width, tokens * 4 * width * width),
            Site(f'{p}.fc2', 'linear', 'fc2', block, stage, 4 * width * width, tokens * 4 * width * width),
        ]
    return out


@pytest.fixture(scope='module')
def lrp_like():
    sites = _sites()
    scores = {s.name: 1.0 + (hash(s.name) % 7) / 10 for s in sites if s.has_weights and s.block != 2}
    plan = allocate('lrp_qvit', sites, scores, target_bits=4)
    return sites, plan


def test_random_plan_same_sites_bits_histogram_and_memory(lrp_like):
    sites, plan = lrp_like
    like = plan.resolve(sites)
    movable = [s.name for s in sites if s.has_weights and s.name in plan.scores]
    budget = Budget(weight_bits=4)
    used = account(sites, like).total_weight_bits
    limit = budget.limit_bits(sites)
    hist = Counter(like[n][0] for n in movable)
    assert len(hist) == 3  # the plan moved sites both ways: a real control
    seen = set()
    for seed in range(8):
        bits = random_plan(sites, like, budget=budget, seed=seed, movable=movable).resolve(sites)
        assert Counter(bits[n][0] for n in movable) == hist  # same bit set and histogram
        assert all(bits[n] == like[n] for n in bits if n not in movable)  # unscored sites and matmuls kept
        assert all(w == a for n, (w, a) in bits.items())
        total = account(sites, bits).total_weight_bits
        assert total <= limit and abs(total - used) <= 0.005 * limit  # the budget, at the plan's memory
        seen.add(tuple(sorted(bits.items())))
    assert len(seen) >= 6  # seeds give different plans


def test_random_plan_is_deterministic_per_seed(lrp_like):
    sites, plan = lrp_like
    like = plan.resolve(sites)
    a = random_plan(sites, like, budget=Budget(weight_bits=4), seed=3)
    b = random_plan(sites, like, budget=Budget(weight_bits=4), seed=3)
    assert a.bits == b.bits and a.budget == b.budget
    assert a.budget['holds'] and a.budget['control']['seed'] == 3


def test_random_plan_under_a_bops_budget(lrp_like):
    sites, plan = lrp_like
    like = {s.name: (4, 4) for s in sites}
    max_bops = uniform_bops(sites, 4)
    budget = Budget(weight_bits=4, max_bops=max_bops)
    for seed in range(4):
        bits = random_plan(sites, like, budget=budget, seed=seed, levels=(3, 4, 5), match_counts=False).resolve(sites)
        acc = account(sites, bits)
        assert {w for n, (w, _) in bits.items() if not n.endswith('matmul1')} <= {3, 4, 5}
        assert len({w for w, _ in bits.values()}) > 1  # it did move bits
        assert max_bops * 0.995 <= acc.bops <= max_bops
        assert budget.check(sites, bits).holds


def test_random_plan_refuses_bits_outside_levels(lrp_like):
    sites, plan = lrp_like
    with pytest.raises(ValueError, match='outside levels'):
        random_plan(sites, plan.resolve(sites), budget=Budget(weight_bits=4), seed=0, levels=(4, 5))


def test_percentile_counts_ties_half(claims):
    assert claims.percentile(5.0, [1, 2, 3, 4]) == 100.0
    assert claims.percentile(0.0, [1, 2, 3, 4]) == 0.0
    assert claims.percentile(2.0, [1, 2, 3, 4]) == 37.5
    assert math.isnan(claims.percentile(1.0, []))


def test_plan_verdicts(claims):
    uniform = {0: 60.0, 1: 61.0, 2: 59.0}
    randoms = [{0: 60.0 + d, 1: 61.0 + d, 2: 59.0 + d} for d in (-0.4, -0.2, 0.0, 0.1, 0.2, 0.3, 0.5, 0.6)]
    better = {0: 62.0, 1: 62.9, 2: 61.1}  # +2 on every set, above every random plan
    v = claims.plan_verdict(better, uniform, randoms, 0.1)
    assert v['verdict'] == 'holds' and v['percentile'] == 100.0 and v['sets'] == 3
    randoms_high = randoms + [{0: 63.0, 1: 64.0, 2: 62.0}] * 4  # random plans do as well: no information
    assert (
        claims.plan_verdict(better, uniform, randoms_high, 0.1)['verdict']
        == 'not shown: beats uniform, but not the random plans'
    )
    noisy = {0: 61.0, 1: 60.5, 2: 59.0}  # +1, -0.5, 0: not beyond 2 SE
    assert (
        claims.plan_verdict(noisy, uniform, randoms, 0.1)['verdict']
        == 'not shown: no measurable difference from uniform'
    )
    worse = {0: 58.0, 1: 58.9, 2: 57.1}
    assert claims.plan_verdict(worse, uniform, randoms, 0.1)['verdict'] == 'reversed: below uniform'
    assert claims.plan_verdict(better, uniform, [], 0.1)['verdict'] == 'beats uniform; no random control run'
    tiny = {s: v + 0.05 for s, v in uniform.items()}  # consistent but below the metric's resolution
    assert claims.plan_verdict(tiny, uniform, randoms, 0.1)['beats_uniform'] is False


def test_method_verdict(claims):
    assert claims.method_verdict([(61.0, 60.0), (62.0, 60.9), (60.0, 59.2)], 0.1)['verdict'] == 'holds'
    assert claims.method_verdict([(59.0, 60.0), (60.0, 60.9), (58.0, 59.2)], 0.1)['verdict'].startswith('reversed')
    mixed = claims.method_verdict([(61.0, 60.0), (59.0, 60.0), (60.1, 60.0)], 0.1)
    assert mixed['verdict'].startswith('not shown') and mixed['ahead'] == 2 and mixed['behind'] == 1
    assert claims.method_verdict([], 0.1)['verdict'] == 'not run'


def _row(model, plan, method, s, value, seed=None):
    key = 'top1' if model == 'classifier' else 'box_ap'
    return {
        'model': model,
        'plan': plan,
        'method': method,
        'set': s,
        'seed': seed,
        key: value,
        'mask_ap': value - 3,
        'eval_images': 400,
        'set_size': 8,
        'avg_w_bits': 4.0,
        'avg_a_bits': 4.0,
        'weight_mb': 1.0,
        'gbops': 6.0,
    }


def test_verdicts_and_tables_follow_the_rows(claims):
    rows = [_row('classifier', 'float', None, None, 70.0)]
    for s in range(3):
        for m, shift in (('repq', 0.0), ('crl', 1.0)):
            rows += [
                _row('classifier', 'uniform', m, s, 60.0 + shift + s),
                _row('classifier', 'lrp', m, s, 60.0 + shift + s + 0.5 * (s % 2)),
            ]
        rows += [_row('classifier', 'random', 'crl', s, 60.5 + s + 0.1 * seed, seed) for seed in range(8)]
    verdicts = {(v['claim'], v.get('method')): v for v in claims.claim_verdicts(rows)}
    assert verdicts[(1, 'crl')]['verdict'] == 'not shown: no measurable difference from uniform'
    assert verdicts[(2, 'crl vs repq')]['verdict'] == 'holds' and verdicts[(2, 'crl vs repq')]['pairs'] == 6
    markdown = claims.tables(rows)
    assert '| lrp | weight memory | crl |' in markdown and 'over 8 plans' in markdown
    assert 'not shown: no measurable difference from uniform' in markdown
    flipped = [dict(r, top1=r['top1'] - 2.0) if r.get('method') == 'crl' else r for r in rows]
    assert {(v['claim'], v['method']): v['verdict'] for v in claims.claim_verdicts(flipped)}[
        (2, 'crl vs repq')
    ].startswith('reversed')


def test_methods_side_by_side_follows_the_rows(claims):
    """One line per option any model ran, its metric per model and the median calibration seconds."""
    rows = []
    for s, seconds in enumerate((4.0, 6.0, 20.0)):
        rows += [
            dict(_row('classifier', 'uniform', 'repq', s, 60.0 + s), quant_seconds=seconds),
            dict(_row('classifier', 'uniform', 'sqb', s, 62.0), quant_seconds=2 * seconds),
            dict(_row('mask_rcnn', 'uniform', 'repq', s, 50.0), quant_seconds=30.0),
            dict(_row('mask_rcnn', 'lampq', 'crl', s, 52.0 + s), quant_seconds=40.0 + s),
        ]
    lines = claims.methods_side_by_side(rows)
    assert lines[2] == '| option | how | plan | classifier top-1 % | mask_rcnn box AP | calibration s |'
    body = [line for line in lines[4:] if line]
    assert body == [
        "| RepQ-ViT's reparameterization | `method='repq'` | uniform | 61.0 ± 0.8 | 50.0 ± 0.0 | 6.0 / 30.0 |",
        "| MPTQ-ViT's SQ-b (SmoothQuant with a bias term) | `method='none', smooth='sq-b'` | uniform | 62.0 ± 0.0 | — "
        '| 12.0 / — |',
        "| LampQ's type-aware metric, iterative ILP | `tools/sensitivity_plan.py --type-aware --iterations 1` | lampq "
        '| — | 53.0 ± 0.8 | — / 41.0 |',
    ]
    assert claims.methods_side_by_side([_row('classifier', 'float', None, None, 70.0)]) == []
    assert lines[0].startswith('**Methods side by side**') and '\n'.join(lines) in claims.tables(rows)


def test_committed_docs_block_is_generated_from_the_results(claims):
    results = REPO / 'results' / 'claims.json'
    if not results.is_file():
        pytest.skip('results/claims.json not committed yet')
    report = json.load(open(results))
    markdown = claims.tables(report['rows'], {'grid': report['grid']})
    doc = (REPO / claims.DOC).read_text()
    assert f'\n\n{markdown}\n{claims.MARKERS[1]}' in doc
    assert report['verdicts'] == claims.json_safe(claims.claim_verdicts(report['rows']))


def test_a_run_adds_to_the_published_rows_instead_of_replacing_them(claims, tmp_path):
    """A fresh work dir (its per-cell files gone) must not rewrite results/claims.json with its new cells alone."""

    def row(plan, method, s, top1):
        return {'model': 'classifier', 'plan': plan, 'method': method, 'set': s, 'seed': None, 'top1': top1}

    out = tmp_path / 'claims.json'
    out.write_text(
        json.dumps({'grid': ['old command'], 'rows': [row('uniform', 'crl', 0, 66.0), row('lrp', 'crl', 0, 66.4)]})
    )
    rows, grid = claims.with_published(
        [row('lrp', 'crl', 0, 67.0), row('uniform', 'sqb', 0, 68.2)], ['new command'], str(out)
    )
    assert sorted((r['plan'], r['method'], r['top1']) for r in rows) == [
        ('lrp', 'crl', 67.0),
        ('uniform', 'crl', 66.0),
        ('uniform', 'sqb', 68.2),
    ]
    assert grid == ['old command', 'new command']
    assert claims.with_published([], [], str(tmp_path / 'absent.json')) == ([], [])
