"""The measured-sensitivity allocator: the integer program behind it, the Fisher measurement, the tool."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mmdet_lrpq import QuantConfig
from mmdet_lrpq.models import ModelQuantizer
from mmdet_lrpq.models.fisher import fisher_sensitivity
from mmdet_lrpq.plan import Budget, Site, allocate

REPO = Path(__file__).resolve().parents[1]


def _sensitivity_plan_tool():
    """tools/sensitivity_plan.py, loaded from its file (a command-line program, not a module of the package)."""
    spec = importlib.util.spec_from_file_location('sensitivity_plan_tool', REPO / 'tools' / 'sensitivity_plan.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _miniworld_tool():
    """The tool and the miniature world's data root, or skip where the world is not generated."""
    data = REPO / 'data' / 'miniworld'
    if not (data / 'annotations' / 'instances_calib.json').is_file():
        pytest.skip('miniature world not generated (python tools/miniworld/generate.py)')
    return _sensitivity_plan_tool(), data


def random_problem(n: int, seed: int) -> tuple[list[Site], dict]:
    g = torch.Generator().manual_seed(seed)
    sites = [Site(f's{i}', 'linear', params=int(torch.randint(10, 500, (1,), generator=g))) for i in range(n)]
    sites.insert(2, Site('mm', 'matmul', 'matmul1', block=0))
    table = {}
    for s in sites:
        if s.has_weights:
            base = float(torch.rand(1, generator=g)) * 10
            table[s.name] = {3: base * 4, 4: base, 5: base / 4}
    return sites, table


@pytest.mark.parametrize('budget_bits', [4, 4.25, 3.6])
def test_sensitivity_allocator_meets_the_budget_exactly(budget_bits):
    sites, table = random_problem(25, seed=int(budget_bits * 100))
    plan = allocate('sensitivity', sites, sensitivity=table, target_bits=4, budget=Budget(weight_bits=budget_bits))
    bits = plan.resolve(sites)
    check = Budget(weight_bits=budget_bits).check(sites, bits)
    assert check.holds and plan.budget['used_bits'] == check.used_bits and plan.budget['holds']
    # every cost falls with bits, so nothing affordable is left to raise
    assert all(bits[s.name][0] == 5 or s.params > check.margin_bits for s in sites if s.has_weights)
    assert {w for n, (w, a) in bits.items() if n != 'mm'} <= {3, 4, 5} and all(w == a for w, a in bits.values())
    assert bits['mm'] == (5, 5)  # matmuls: the shared rule (block 0: k+1)
    assert plan.allocator == 'sensitivity' and plan.scores == {n: c[4] for n, c in table.items()}


def test_sensitivity_allocator_is_optimal_on_a_small_case():
    sites, table = random_problem(5, seed=3)
    weighted = [s for s in sites if s.has_weights]
    plan = allocate('sensitivity', sites, sensitivity=table, target_bits=4)
    limit = 4 * sum(s.params for s in weighted)
    best = min(
        (sum(table[s.name][b] for s, b in zip(weighted, combo)), combo)
        for combo in itertools.product((3, 4, 5), repeat=len(weighted))
        if sum(s.params * b for s, b in zip(weighted, combo)) <= limit
    )
    got = sum(table[s.name][plan.bits[s.name][0]] for s in weighted)
    assert got == pytest.approx(best[0])


def test_low_bits_go_where_sensitivity_is_low():
    """Equal sizes: the site that hardly cares about bits pays for the one that does."""
    sites = [Site('flat', 'conv', params=100), Site('steep', 'conv', params=100), Site('mid', 'linear', params=100)]
    table = {'flat': {3: 5.1, 4: 5.0, 5: 4.95}, 'steep': {3: 10.0, 4: 2.0, 5: 0.1}, 'mid': {3: 3.0, 4: 1.0, 5: 0.5}}
    plan = allocate('sensitivity', sites, sensitivity=table, target_bits=4)
    assert plan.bits == {'flat': (3, 3), 'steep': (5, 5), 'mid': (4, 4)}
    # a score-times-bits ILP on the k-bit costs ranks by size, not by what a bit buys
    assert allocate('ilp', sites, {n: c[4] for n, c in table.items()}, target_bits=4).bits['flat'] == (5, 5)


def bops_problem(n: int, seed: int) -> tuple[list[Site], dict]:
    """A random problem whose sites also have MACs, unrelated to their weight counts (conv vs linear)."""
    sites, table = random_problem(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    return [
        Site(
            s.name, s.kind, s.layer_type, s.block, s.stage, s.params, int(torch.randint(1000, 90000, (1,), generator=g))
        )
        for s in sites
    ], table


def test_a_bops_budget_is_met_exactly_and_solved_optimally():
    from mmdet_lrpq.plan import account, uniform_bops

    sites, table = bops_problem(6, seed=7)
    pins = {'s0': 8}  # e.g. the patch embedding's 8-bit image input
    limit = uniform_bops(sites, 4, pins)
    assert limit == account(sites, {s.name: (4, 8 if s.name == 's0' else 4) for s in sites}).bops
    weight_only = allocate('sensitivity', sites, sensitivity=table, target_bits=4, act_bits=pins)
    plan = allocate(
        'sensitivity',
        sites,
        sensitivity=table,
        target_bits=4,
        act_bits=pins,
        budget=Budget(weight_bits=4, max_bops=limit),
    )
    bits = plan.resolve(sites)
    assert bits['s0'][1] == 8 and weight_only.bits['s0'][1] == 8  # the pinned input, in the plan
    used = account(sites, bits).bops
    assert used <= limit and plan.budget['used_bops'] == used and plan.budget['limit_bops'] == limit
    assert plan.budget['max_bops'] == limit and plan.budget['holds']
    # this random case is one where the weight-only optimum breaks the BOPs budget, so the row binds
    assert account(sites, weight_only.resolve(sites)).bops > limit
    # brute force over every choice: same optimum as the integer program
    weighted = [s for s in sites if s.has_weights]
    fixed = {s.name: bits[s.name] for s in sites if not s.has_weights}
    best = math.inf
    for combo in itertools.product((3, 4, 5), repeat=len(weighted)):
        trial = {**fixed, **{s.name: (b, pins.get(s.name, b)) for s, b in zip(weighted, combo)}}
        if Budget(weight_bits=4, max_bops=limit).check(sites, trial).holds:
            best = min(best, sum(table[s.name][b] for s, b in zip(weighted, combo)))
    assert sum(table[s.name][bits[s.name][0]] for s in weighted) == pytest.approx(best)


def test_bops_budgets_that_cannot_be_honoured_are_errors():
    from mmdet_lrpq.plan import uniform_bops

    sites, table = bops_problem(6, seed=2)
    scores = {n: c[4] for n, c in table.items()}
    limit = uniform_bops(sites, 4)
    for name in ('uniform', 'lrp_qvit', 'greedy'):
        with pytest.raises(ValueError, match=f"allocator '{name}' budgets weight memory only"):
            allocate(name, sites, scores, target_bits=4, budget=Budget(weight_bits=4, max_bops=limit))
    assert allocate('ilp', sites, scores, target_bits=4, budget=Budget(weight_bits=4, max_bops=limit)).budget['holds']
    with pytest.raises(ValueError, match=r'impossible budget .* max_bops=\d+ BOPs per image'):
        allocate(
            'sensitivity',
            sites,
            sensitivity=table,
            target_bits=4,
            budget=Budget(weight_bits=4, max_bops=uniform_bops(sites, 3) - 1),
        )
    unmeasured, _ = random_problem(6, seed=2)
    with pytest.raises(ValueError, match=r'needs the sites\' MACs'):
        allocate('sensitivity', unmeasured, sensitivity=table, target_bits=4, budget=Budget(weight_bits=4, max_bops=10))
    with pytest.raises(ValueError, match=r'needs the sites\' MACs'):
        Budget(weight_bits=4, max_bops=10).check(unmeasured, {s.name: (4, 4) for s in unmeasured})
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match='max_bops must be a positive integer'):
            Budget(weight_bits=4, max_bops=bad)
    with pytest.raises(ValueError, match="act_bits\\['s0'\\]"):
        allocate('sensitivity', sites, sensitivity=table, target_bits=4, act_bits={'s0': 9})


def test_impossible_budget_and_bad_tables_are_errors():
    sites, table = random_problem(6, seed=1)
    with pytest.raises(ValueError, match='impossible budget'):
        allocate('sensitivity', sites, sensitivity=table, target_bits=4, budget=Budget(weight_bits=2.9))
    with pytest.raises(ValueError, match=r'no cost for \[5\] bits'):
        allocate('sensitivity', sites, sensitivity={**table, 's0': {3: 1.0, 4: 0.5}}, target_bits=4)
    with pytest.raises(ValueError, match='finite'):
        allocate('sensitivity', sites, sensitivity={**table, 's0': {3: math.nan, 4: 1.0, 5: 0.5}}, target_bits=4)
    with pytest.raises(ValueError, match='without weights'):
        allocate('sensitivity', sites, sensitivity={**table, 'mm': {3: 1, 4: 1, 5: 1}}, target_bits=4)
    with pytest.raises(ValueError, match='not in the site list'):
        allocate('sensitivity', sites, sensitivity={**table, 'nope': {3: 1, 4: 1, 5: 1}}, target_bits=4)
    with pytest.raises(ValueError, match='takes sensitivity='):
        allocate('sensitivity', sites, {'s0': 1.0}, target_bits=4)
    with pytest.raises(ValueError, match='takes sensitivity='):
        allocate('ilp', sites, {'s0': 1.0}, sensitivity=table, target_bits=4)


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)
        self.unused = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(self.norm(h)) + 0 * self.unused(h)


def small_regression():
    """SmallNet, its quantization sites, three seeded (input, target) batches and a squared-error loss."""
    model = SmallNet().eval()
    sites = ModelQuantizer(model, QuantConfig()).sites()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 4, generator=g)) for _ in range(3)]

    def loss(m, batch):
        x, target = batch
        return (m(x) - target).pow(2).mean()

    return model, sites, batches, loss


def test_fisher_sensitivity_falls_with_bits_and_is_deterministic():
    model, sites, batches, loss = small_regression()

    table = fisher_sensitivity(
        model, sites, [3, 4, 5], batches, loss, per_channel_inputs=frozenset({'fc'}), fixed_a_bits={'conv': 8}
    )
    assert set(table) == {'conv', 'fc', 'unused'}
    for name in ('conv', 'fc'):
        assert table[name][3] > table[name][4] > table[name][5] > 0
    assert table['unused'] == {3: 0.0, 4: 0.0, 5: 0.0}  # no gradient reaches it
    assert table == fisher_sensitivity(
        model, sites, [3, 4, 5], batches, loss, per_channel_inputs=frozenset({'fc'}), fixed_a_bits={'conv': 8}
    )
    assert all(p.grad is None for p in model.parameters())
    # the pinned input contributes the same at every bit-width: only the weight term moves
    free = fisher_sensitivity(model, sites, [3, 4, 5], batches, loss)
    assert free['conv'][3] - table['conv'][3] != pytest.approx(free['conv'][5] - table['conv'][5])


def test_sensitivity_plan_tool_on_the_miniature_detector(tmp_path, capsys):
    """The whole detector's sites, the budget over all of them, the cache, a plan the hook accepts."""
    sensitivity_plan, data = _miniworld_tool()
    out = tmp_path / 'plan.json'
    argv = [
        'configs/miniworld/mask_rcnn_swin_mini_quant.py',
        'checkpoints/miniworld/mask_rcnn_swin_mini.pth',
        '--target',
        'mp4',
        '--calib',
        f'data_root={data}/',
        'ann_file=annotations/instances_calib.json',
        'img_prefix=calib/',
        'image_ids=[1,2]',
        '--out',
        str(out),
        '--no-progress',
    ]
    plan = sensitivity_plan.main([str(REPO / a) if a.startswith(('configs', 'checkpoints')) else a for a in argv])
    cfg, model, _ = sensitivity_plan.build_detector(
        sensitivity_plan.parse_args([str(REPO / argv[0]), str(REPO / argv[1]), '--target', 'mp4', '--out', str(out)])
    )
    quantizer = ModelQuantizer(model, QuantConfig(plan=str(out)))
    sites = quantizer.sites()
    assert set(plan.scores) == {s.name for s in sites if s.has_weights}
    assert any(n.startswith('roi_head.') for n in plan.scores) and any(n.startswith('neck.') for n in plan.scores)
    bits = quantizer.resolve_bits(sites)  # validates and checks the architecture
    assert Budget(weight_bits=4).check(sites, bits).holds
    saved = json.loads(out.read_text())
    assert saved['allocator'] == 'sensitivity' and saved['source']['image_ids'] == [1, 2]
    assert saved['architecture'] and saved['command'].startswith('python tools/sensitivity_plan.py')
    capsys.readouterr()
    sensitivity_plan.main(
        [str(REPO / a) if a.startswith(('configs', 'checkpoints')) else a for a in argv] + ['--budget-bits', '3.8']
    )
    assert 'sensitivity from cache' in capsys.readouterr().out
    # the patch embedding's input stays at 8 bits in the plan, as the quantizer will run it
    assert [n for n in plan.bits if 'patch_embed' in n] == ['backbone.patch_embed.projection']
    assert plan.bits['backbone.patch_embed.projection'][1] == 8

    # a BOPs budget: no more BOPs than uniform 4 bits on the MACs counted on the calibration images
    from mmdet_lrpq.engine.calib_data import CalibSettings
    from mmdet_lrpq.engine.detector_sensitivity import measure_macs
    from mmdet_lrpq.engine.quantize import quantize_detector
    from mmdet_lrpq.plan import account, uniform_bops

    bops_out = tmp_path / 'bops.json'
    bops_plan = sensitivity_plan.main(
        [str(REPO / a) if a.startswith(('configs', 'checkpoints')) else a for a in argv]
        + ['--bops-bits', '4', '--out', str(bops_out), '--scores-cache', f'{out}.scores.json']
    )
    printed = capsys.readouterr().out
    assert 'sensitivity from cache' in printed and 'BOPs' in printed
    calib = CalibSettings.from_options(
        dict(data_root=f'{data}/', ann_file='annotations/instances_calib.json', img_prefix='calib/', image_ids=[1, 2])
    )
    measured = measure_macs(model, cfg, quantizer.config, calib)
    limit = uniform_bops(measured, 4, {'backbone.patch_embed.projection': 8})
    b = bops_plan.budget
    assert b['limit_bops'] == limit and b['used_bops'] == account(measured, bops_plan.resolve(measured)).bops <= limit
    assert b['used_bits'] <= b['limit_bits'] and b['holds']
    # MACs are counted as the quantization report counts them: equal wherever they do not depend on how
    # many detections the (quantized) model produces, i.e. everywhere but the mask head
    report = quantize_detector(model, cfg, QuantConfig(method='crl', w_bits=4, a_bits=4), calib, progress=False)
    reported = {s.name: s.macs for s in report.sites}
    assert all(s.macs > 0 for s in measured)
    assert {s.name: s.macs for s in measured if 'mask_head' not in s.name} == {
        n: m for n, m in reported.items() if 'mask_head' not in n
    }


def test_calib_option_overrides_one_field_of_the_hooks_calibration_settings():
    """--calib num_images=2 used to replace the config's calib (its ann_file and img_prefix lost)."""
    import argparse

    sensitivity_plan = _sensitivity_plan_tool()
    hook = {
        'method': 'repq',
        'calib': {'ann_file': 'annotations/instances_calib.json', 'img_prefix': 'calib/', 'num_images': 8, 'seed': 3},
    }
    args = argparse.Namespace(calib={'num_images': 2}, scope=None, method=None)
    config, calib = sensitivity_plan.settings(args, hook)
    assert (calib.ann_file, calib.img_prefix, calib.num_images, calib.seed) == (
        'annotations/instances_calib.json',
        'calib/',
        2,
        3,
    )
    assert config.method == 'repq'
    _, calib = sensitivity_plan.settings(argparse.Namespace(calib=None, scope=None, method=None), hook)
    assert calib.num_images == 8


# ---------------------------------------------------------------- LampQ's options


def swin_like_problem(seed: int) -> tuple[list[Site], dict]:
    """Sites of six component types whose raw cost scales differ by orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    magnitude = {'qkv': 1e3, 'proj': 10.0, 'fc1': 1e-2, 'fc2': 1.0, 'reduction': 1e2, 'other': 1e-1}
    sites, table = [], {}
    for block in range(4):
        for lt, params in (('qkv', 300), ('proj', 100), ('fc1', 400), ('fc2', 400)):
            sites.append(
                Site(f'backbone.blocks.{block}.{lt}', 'linear', lt, block=block, params=params, macs=params * 49)
            )
        if block == 1:
            sites.append(Site('backbone.blocks.1.matmul1', 'matmul', 'matmul1', block=1, macs=5000))
    sites.append(Site('backbone.downsample.reduction', 'linear', 'reduction', params=800, macs=800 * 49))
    sites += [
        Site('neck.lateral_convs.0.conv', 'conv', params=200, macs=200 * 196),
        Site('roi_head.bbox_head.shared_fcs.0', 'linear', params=900, macs=900 * 20),
        Site('roi_head.bbox_head.fc_cls', 'linear', params=60, macs=60 * 20),
    ]
    for s in sites:
        if s.has_weights:
            m = magnitude.get(s.layer_type, magnitude['other']) * (0.5 + float(torch.rand(1, generator=g)))
            steep = 2 + 3 * float(torch.rand(1, generator=g))
            table[s.name] = {3: m * steep, 4: m, 5: m / steep}
    return sites, table


def test_component_types_of_backbone_neck_and_heads():
    from mmdet_lrpq.plan import component_type

    assert component_type(Site('backbone.stages.0.blocks.0.attn.w_msa.qkv', 'linear', 'qkv', 0)) == 'qkv'
    assert component_type(Site('backbone.stages.0.downsample.reduction', 'linear', 'reduction')) == 'reduction'
    assert component_type(Site('backbone.patch_embed.projection', 'conv', 'patch_embed')) == 'patch_embed'
    assert component_type(Site('neck.fpn_convs.2.conv', 'conv')) == 'neck'
    assert component_type(Site('rpn_head.rpn_cls', 'conv')) == 'rpn_head'
    assert component_type(Site('roi_head.bbox_head.shared_fcs.0', 'linear')) == 'roi_head.bbox_head'
    assert component_type(Site('roi_head.bbox_head.2.fc_reg', 'linear')) == 'roi_head.bbox_head'  # Cascade
    assert component_type(Site('roi_head.mask_head.convs.0.conv', 'conv')) == 'roi_head.mask_head'
    assert component_type(Site('head.fc', 'linear')) == 'head'


def test_type_aware_normalisation_puts_every_type_on_one_scale():
    from mmdet_lrpq.plan import component_type, type_normalize

    sites, table = swin_like_problem(seed=0)
    normalized, scale = type_normalize(table, sites, 4)
    by_name = {s.name: s for s in sites}
    types = {component_type(by_name[n]) for n in table}
    assert set(scale) == types == {'qkv', 'proj', 'fc1', 'fc2', 'reduction', 'neck', 'roi_head.bbox_head'}
    for t in types:
        members = [n for n in table if component_type(by_name[n]) == t]
        assert sum(normalized[n][4] for n in members) / len(members) == pytest.approx(1.0)  # mean at k is 1
        for n in members:  # one factor per type: curve shapes and ranking unchanged
            assert all(normalized[n][b] == pytest.approx(scale[t] * table[n][b]) for b in (3, 4, 5))
    # the raw scales differ by 1e5 (qkv vs fc1); normalised, the types' means are equal
    raw_mean = {t: sum(table[n][4] for n in table if component_type(by_name[n]) == t) for t in ('qkv', 'fc1')}
    assert raw_mean['qkv'] / raw_mean['fc1'] > 1e4
    # the raw ILP spends every extra bit on the loud type; the normalised one across types
    raw = allocate('sensitivity', sites, sensitivity=table, target_bits=4)
    typed = allocate('sensitivity', sites, sensitivity=normalized, target_bits=4)
    fc1 = [n for n in table if by_name[n].layer_type == 'fc1']
    assert all(raw.bits[n][0] == 3 for n in fc1) and any(typed.bits[n][0] > 3 for n in fc1)
    # a type whose costs are all zero (no gradient reaches it) is left as it is
    zeroed = {**table, 'neck.lateral_convs.0.conv': {3: 0.0, 4: 0.0, 5: 0.0}}
    out, scale = type_normalize(zeroed, sites, 4)
    assert scale['neck'] == 1.0 and out['neck.lateral_convs.0.conv'] == {3: 0.0, 4: 0.0, 5: 0.0}
    # a custom grouping: one type for everything is a single global factor
    out, scale = type_normalize(table, sites, 4, type_of=lambda s: 'all')
    assert list(scale) == ['all']
    assert allocate('sensitivity', sites, sensitivity=out, target_bits=4).bits == raw.bits


def context_measure(base: dict, sites: list[Site], gamma: float = 0.6, calls: list = None):
    """A synthetic re-measurement: a site's costs grow with how many bits the sites of its block lost."""
    block = {s.name: s.block for s in sites}

    def measure(assignment):
        if calls is not None:
            calls.append(dict(assignment))
        out = {}
        for name, costs in base.items():
            lost = sum(max(0, 4 - assignment[m][0]) for m in base if m != name and block[m] == block[name])
            out[name] = {b: c * (1 + gamma * lost) * (1.5 if b == 3 and lost else 1.0) for b, c in costs.items()}
        return out

    return measure


@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('bops', [False, True])
def test_iterative_ilp_meets_its_budget_and_never_does_worse_than_one_pass(seed, bops):
    from mmdet_lrpq.plan import account, allocate_lampq, plan_cost, type_normalize, uniform_bops

    sites, table = swin_like_problem(seed)
    pins = {'backbone.blocks.0.qkv': 8}
    budget = Budget(weight_bits=4, max_bops=uniform_bops(sites, 4, pins) if bops else None)
    calls = []
    comparable = type_normalize(table, sites, 4)[0]  # raw scales this far apart leave the raw loop nothing to move
    for type_aware in (False, True):
        calls.clear()
        measure = context_measure(table if type_aware else comparable, sites, calls=calls)
        plan = allocate_lampq(
            sites,
            table if type_aware else comparable,
            target_bits=4,
            budget=budget,
            act_bits=pins,
            type_aware=type_aware,
            iterations=3,
            measure=measure,
        )
        bits = plan.resolve(sites)
        check = budget.check(sites, bits)
        assert check.holds and plan.budget['holds'] and bits['backbone.blocks.0.qkv'][1] == 8
        if bops:
            assert account(sites, bits).bops <= budget.max_bops
        record = plan.source['lampq']
        assert record['type_aware'] is type_aware and 1 <= len(calls) <= 3 == record['iterations']
        assert len(record['history']) == len(calls) + 1
        # on the last measured table (the metric the loop ends with), at least as good as one ILP pass
        last = measure(calls[-1])
        last = type_normalize(last, sites, 4)[0] if type_aware else last
        one_pass = allocate('sensitivity', sites, sensitivity=comparable, target_bits=4, budget=budget, act_bits=pins)
        assert plan_cost(last, bits) <= plan_cost(last, one_pass.resolve(sites)) + 1e-9
        assert record['objective_on_last_table']['chosen'] == pytest.approx(plan_cost(last, bits))
        assert record['objective_on_last_table']['one_pass'] == pytest.approx(plan_cost(last, one_pass.resolve(sites)))
        # every re-solve is optimal on its own table: it never costs more there than the plan it was measured at
        for step in record['history'][1:]:
            assert step['objective'] <= step['objective_before'] + 1e-9
        # each re-measurement was given the whole current assignment, pinned input bits included
        assert all(set(c) == {s.name for s in sites} and c['backbone.blocks.0.qkv'][1] == 8 for c in calls)


def test_the_synthetic_iterations_do_move_plans():
    """The cases above are not all fixed points: in both modes the loop changes plans and finds cheaper ones."""
    from mmdet_lrpq.plan import allocate_lampq, type_normalize

    moved, gained = {False: 0, True: 0}, {False: 0.0, True: 0.0}
    for seed in range(6):
        sites, table = swin_like_problem(seed)
        for type_aware in (False, True):
            base = table if type_aware else type_normalize(table, sites, 4)[0]
            record = allocate_lampq(
                sites, base, target_bits=4, type_aware=type_aware, iterations=3, measure=context_measure(base, sites)
            ).source['lampq']
            moved[type_aware] += sum(step['changed_sites'] for step in record['history'][1:])
            gained[type_aware] += (
                record['objective_on_last_table']['one_pass'] - record['objective_on_last_table']['chosen']
            )
    assert moved[False] > 0 and moved[True] > 0 and gained[False] > 0 and gained[True] > 0


def test_iterative_ilp_is_never_worse_even_when_the_solver_stops_early():
    """With a loose gap a re-solve may be worse than an earlier plan: the best on the last table is kept."""
    from mmdet_lrpq.plan import allocate_lampq, plan_cost

    sites, table = swin_like_problem(seed=4)
    calls = []
    plan = allocate_lampq(
        sites, table, target_bits=4, iterations=2, measure=context_measure(table, sites, calls=calls), mip_rel_gap=0.5
    )
    last = context_measure(table, sites)(calls[-1])
    one_pass = allocate('sensitivity', sites, sensitivity=table, target_bits=4, mip_rel_gap=0.5)
    assert plan_cost(last, plan.resolve(sites)) <= plan_cost(last, one_pass.resolve(sites)) + 1e-9
    assert Budget(weight_bits=4).check(sites, plan.resolve(sites)).holds


def test_lampq_options_off_are_the_one_pass_planner_and_a_fixed_point_stops_early():
    from mmdet_lrpq.plan import allocate_lampq

    sites, table = swin_like_problem(seed=1)
    one_pass = allocate('sensitivity', sites, sensitivity=table, target_bits=4)
    off = allocate_lampq(sites, table, target_bits=4)
    assert off == one_pass and off.source == {} and off.scores == one_pass.scores
    calls = []
    same = allocate_lampq(
        sites, table, target_bits=4, iterations=5, measure=lambda a: calls.append(a) or table
    )  # nothing depends on the assignment
    assert len(calls) == 1 and same.bits == one_pass.bits
    assert same.source['lampq']['history'][1]['changed_sites'] == 0


def test_lampq_options_are_validated_naming_the_option():
    from mmdet_lrpq.plan import allocate_lampq, type_normalize

    sites, table = swin_like_problem(seed=2)
    for bad in (-1, 11, 1.5, True, '2'):
        with pytest.raises(ValueError, match=r'iterations must be an integer in 0\.\.10'):
            allocate_lampq(sites, table, target_bits=4, iterations=bad, measure=lambda a: table)
    with pytest.raises(ValueError, match=r'iterations=2 needs measure='):
        allocate_lampq(sites, table, target_bits=4, iterations=2)
    for bad in (1, 'yes', None):
        with pytest.raises(ValueError, match='type_aware must be True or False'):
            allocate_lampq(sites, table, target_bits=4, type_aware=bad)
    with pytest.raises(ValueError, match='type_of must be a callable'):
        type_normalize(table, sites, 4, type_of='layer_type')
    with pytest.raises(ValueError, match=r"type_of\('backbone.blocks.0.qkv'\) must return a non-empty string"):
        type_normalize(table, sites, 4, type_of=lambda s: None)
    with pytest.raises(ValueError, match='no cost at the target 6 bits'):
        type_normalize(table, sites, 6)
    with pytest.raises(ValueError, match='not in the site list'):
        type_normalize({**table, 'nope': {3: 1, 4: 1, 5: 1}}, sites, 4)
    broken = {n: c for n, c in table.items() if n != 'backbone.blocks.2.fc1'}
    broken['backbone.blocks.2.fc1'] = {3: 1.0, 4: 0.5}
    with pytest.raises(ValueError, match=r'iteration 1: the re-measured sensitivity .* no cost for \[5\] bits'):
        allocate_lampq(sites, table, target_bits=4, iterations=1, measure=lambda a: broken)


def test_tool_refuses_bad_iterations_naming_the_option(capsys):
    sensitivity_plan = _sensitivity_plan_tool()
    for bad in ('-1', '11', 'two'):
        with pytest.raises(SystemExit):
            sensitivity_plan.parse_args(['c.py', 'w.pth', '--target', 'mp4', '--out', 'x.json', '--iterations', bad])
        assert '--iterations' in capsys.readouterr().err
    args = sensitivity_plan.parse_args(['c.py', 'w.pth', '--target', 'mp4', '--out', 'x.json'])
    assert args.iterations == 0 and args.type_aware is False  # off by default
    args = sensitivity_plan.parse_args(
        ['c.py', 'w.pth', '--target', 'mp4', '--out', 'x.json', '--type-aware', '--iterations', '2']
    )
    assert args.iterations == 2 and args.type_aware is True


def test_fisher_sensitivity_given_an_assignment_measures_at_the_quantized_model():
    model, sites, batches, loss = small_regression()

    before = {k: v.clone() for k, v in model.state_dict().items()}
    float_table = fisher_sensitivity(model, sites, [3, 4, 5], batches, loss)
    at_plan = fisher_sensitivity(model, sites, [3, 4, 5], batches, loss, assignment={'conv': (3, 3), 'fc': (3, 3)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored
    assert all(p.grad is None for p in model.parameters())
    assert at_plan != float_table and at_plan['unused'] == {3: 0.0, 4: 0.0, 5: 0.0}
    for name in ('conv', 'fc'):
        assert at_plan[name][3] > at_plan[name][5] > 0
    # an assignment at 8 bits is close to the float model; an empty one is the float model exactly
    near = fisher_sensitivity(model, sites, [3, 4, 5], batches, loss, assignment={'conv': (8, 8), 'fc': (8, 8)})
    assert near['fc'][3] == pytest.approx(float_table['fc'][3], rel=0.1)
    assert fisher_sensitivity(model, sites, [3, 4, 5], batches, loss, assignment={}) == float_table


def test_sensitivity_plan_tool_with_lampq_options_on_the_miniature_detector(tmp_path, capsys):
    """--type-aware --iterations 1 on the real detector: re-measured at the plan, within both budgets."""
    sensitivity_plan, data = _miniworld_tool()
    out = tmp_path / 'plan.json'
    argv = [
        str(REPO / 'configs/miniworld/mask_rcnn_swin_mini_quant.py'),
        str(REPO / 'checkpoints/miniworld/mask_rcnn_swin_mini.pth'),
        '--target',
        'mp4',
        '--calib',
        f'data_root={data}/',
        'ann_file=annotations/instances_calib.json',
        'img_prefix=calib/',
        'image_ids=[1]',
        '--out',
        str(out),
        '--no-progress',
        '--bops-bits',
        '4',
        '--type-aware',
        '--iterations',
        '1',
    ]
    plan = sensitivity_plan.main(argv)
    printed = capsys.readouterr().out
    assert 're-measuring with the detector quantized by the current plan' in printed and 'LampQ: type-aware' in printed
    record = json.loads(out.read_text())['source']['lampq']
    assert record['type_aware'] and record['iterations'] == 1 and len(record['history']) == 2
    assert {'qkv', 'proj', 'fc1', 'fc2', 'reduction', 'neck', 'rpn_head', 'roi_head.bbox_head'} <= set(
        record['type_scales']
    )
    assert record['objective_on_last_table']['chosen'] <= record['objective_on_last_table']['one_pass'] + 1e-9
    b = plan.budget
    assert b['holds'] and b['used_bits'] <= b['limit_bits'] and b['used_bops'] <= b['limit_bops']
    assert '--type-aware --iterations 1' in plan.command
    cfg, model, _ = sensitivity_plan.build_detector(sensitivity_plan.parse_args(argv[:4] + ['--out', str(out)]))
    quantizer = ModelQuantizer(model, QuantConfig(plan=str(out)))
    assert Budget(weight_bits=4).check(quantizer.sites(), quantizer.resolve_bits(quantizer.sites())).holds
    # the float table is cached as before: the options change the allocation, not what is measured first
    cached = json.loads((tmp_path / 'plan.json.scores.json').read_text())
    assert set(cached['sensitivity']) == set(plan.scores)
