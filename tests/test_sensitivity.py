"""The measured-sensitivity allocator: the integer program behind it, the Fisher measurement, the tool."""
from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mmdet_lrpq import QuantConfig
from mmdet_lrpq.models import ModelQuantizer
from mmdet_lrpq.models.sensitivity import fisher_sensitivity
from mmdet_lrpq.plan import Budget, Site, allocate

REPO = Path(__file__).resolve().parents[1]


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
    assert bits['mm'] == (5, 5)                                      # matmuls: the shared rule (block 0: k+1)
    assert plan.allocator == 'sensitivity' and plan.scores == {n: c[4] for n, c in table.items()}


def test_sensitivity_allocator_is_optimal_on_a_small_case():
    sites, table = random_problem(5, seed=3)
    weighted = [s for s in sites if s.has_weights]
    plan = allocate('sensitivity', sites, sensitivity=table, target_bits=4)
    limit = 4 * sum(s.params for s in weighted)
    best = min((sum(table[s.name][b] for s, b in zip(weighted, combo)), combo)
               for combo in itertools.product((3, 4, 5), repeat=len(weighted))
               if sum(s.params * b for s, b in zip(weighted, combo)) <= limit)
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
    return [Site(s.name, s.kind, s.layer_type, s.block, s.stage, s.params,
                 int(torch.randint(1000, 90000, (1,), generator=g))) for s in sites], table


def test_a_bops_budget_is_met_exactly_and_solved_optimally():
    from mmdet_lrpq.plan import account, uniform_bops
    sites, table = bops_problem(6, seed=7)
    pins = {'s0': 8}                                    # e.g. the patch embedding's 8-bit image input
    limit = uniform_bops(sites, 4, pins)
    assert limit == account(sites, {s.name: (4, 8 if s.name == 's0' else 4) for s in sites}).bops
    weight_only = allocate('sensitivity', sites, sensitivity=table, target_bits=4, act_bits=pins)
    plan = allocate('sensitivity', sites, sensitivity=table, target_bits=4, act_bits=pins,
                    budget=Budget(weight_bits=4, max_bops=limit))
    bits = plan.resolve(sites)
    assert bits['s0'][1] == 8 and weight_only.bits['s0'][1] == 8          # the pinned input, in the plan
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
        allocate('sensitivity', sites, sensitivity=table, target_bits=4,
                 budget=Budget(weight_bits=4, max_bops=uniform_bops(sites, 3) - 1))
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
    with pytest.raises(ValueError, match=r"no cost for \[5\] bits"):
        allocate('sensitivity', sites, sensitivity={**table, 's0': {3: 1.0, 4: 0.5}}, target_bits=4)
    with pytest.raises(ValueError, match='finite'):
        allocate('sensitivity', sites, sensitivity={**table, 's0': {3: math.nan, 4: 1.0, 5: 0.5}}, target_bits=4)
    with pytest.raises(ValueError, match='without weights'):
        allocate('sensitivity', sites, sensitivity={**table, 'mm': {3: 1, 4: 1, 5: 1}}, target_bits=4)
    with pytest.raises(ValueError, match='not in the site list'):
        allocate('sensitivity', sites, sensitivity={**table, 'nope': {3: 1, 4: 1, 5: 1}}, target_bits=4)
    with pytest.raises(ValueError, match="takes sensitivity="):
        allocate('sensitivity', sites, {'s0': 1.0}, target_bits=4)
    with pytest.raises(ValueError, match="takes sensitivity="):
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


def test_fisher_sensitivity_falls_with_bits_and_is_deterministic():
    model = SmallNet().eval()
    sites = ModelQuantizer(model, QuantConfig()).sites()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 4, generator=g)) for _ in range(3)]

    def loss(m, batch):
        x, target = batch
        return (m(x) - target).pow(2).mean()

    table = fisher_sensitivity(model, sites, [3, 4, 5], batches, loss, per_channel_inputs=frozenset({'fc'}),
                               fixed_a_bits={'conv': 8})
    assert set(table) == {'conv', 'fc', 'unused'}
    for name in ('conv', 'fc'):
        assert table[name][3] > table[name][4] > table[name][5] > 0
    assert table['unused'] == {3: 0.0, 4: 0.0, 5: 0.0}              # no gradient reaches it
    assert table == fisher_sensitivity(model, sites, [3, 4, 5], batches, loss, per_channel_inputs=frozenset({'fc'}),
                                       fixed_a_bits={'conv': 8})
    assert all(p.grad is None for p in model.parameters())
    # the pinned input contributes the same at every bit-width: only the weight term moves
    free = fisher_sensitivity(model, sites, [3, 4, 5], batches, loss)
    assert free['conv'][3] - table['conv'][3] != pytest.approx(free['conv'][5] - table['conv'][5])


def test_sensitivity_plan_tool_on_the_miniature_detector(tmp_path, capsys):
    """The whole detector's sites, the budget over all of them, the cache, a plan the hook accepts."""
    data = REPO / 'data' / 'miniworld'
    if not (data / 'annotations' / 'instances_calib.json').is_file():
        pytest.skip('miniature world not generated (python tools/miniworld/generate.py)')
    sys.path.insert(0, str(REPO / 'tools'))
    import sensitivity_plan
    out = tmp_path / 'plan.json'
    argv = ['configs/miniworld/mask_rcnn_swin_mini_quant.py', 'checkpoints/miniworld/mask_rcnn_swin_mini.pth',
            '--target', 'mp4', '--calib', f'data_root={data}/', 'ann_file=annotations/instances_calib.json',
            'img_prefix=calib/', 'image_ids=[1,2]', '--out', str(out), '--no-progress']
    plan = sensitivity_plan.main([str(REPO / a) if a.startswith(('configs', 'checkpoints')) else a for a in argv])
    cfg, model, _ = sensitivity_plan.build_detector(sensitivity_plan.parse_args(
        [str(REPO / argv[0]), str(REPO / argv[1]), '--target', 'mp4', '--out', str(out)]))
    quantizer = ModelQuantizer(model, QuantConfig(plan=str(out)))
    sites = quantizer.sites()
    assert set(plan.scores) == {s.name for s in sites if s.has_weights}
    assert any(n.startswith('roi_head.') for n in plan.scores) and any(n.startswith('neck.') for n in plan.scores)
    bits = quantizer.resolve_bits(sites)                     # validates and checks the architecture
    assert Budget(weight_bits=4).check(sites, bits).holds
    saved = json.loads(out.read_text())
    assert saved['allocator'] == 'sensitivity' and saved['source']['image_ids'] == [1, 2]
    assert saved['architecture'] and saved['command'].startswith('python tools/sensitivity_plan.py')
    capsys.readouterr()
    sensitivity_plan.main([str(REPO / a) if a.startswith(('configs', 'checkpoints')) else a for a in argv]
                          + ['--budget-bits', '3.8'])
    assert 'sensitivity from cache' in capsys.readouterr().out
    # the patch embedding's input stays at 8 bits in the plan, as the quantizer will run it
    assert [n for n in plan.bits if 'patch_embed' in n] == ['backbone.patch_embed.projection']
    assert plan.bits['backbone.patch_embed.projection'][1] == 8

    # a BOPs budget: no more BOPs than uniform 4 bits on the MACs counted on the calibration images
    from mmdet_lrpq.engine.calib_data import CalibSettings
    from mmdet_lrpq.engine.quantize import quantize_detector
    from mmdet_lrpq.engine.sensitivity import measure_macs
    from mmdet_lrpq.plan import account, uniform_bops
    bops_out = tmp_path / 'bops.json'
    bops_plan = sensitivity_plan.main([str(REPO / a) if a.startswith(('configs', 'checkpoints')) else a for a in argv]
                                      + ['--bops-bits', '4', '--out', str(bops_out), '--scores-cache', f'{out}.scores.json'])
    printed = capsys.readouterr().out
    assert 'sensitivity from cache' in printed and 'BOPs' in printed
    calib = CalibSettings.from_options(dict(data_root=f'{data}/', ann_file='annotations/instances_calib.json',
                                            img_prefix='calib/', image_ids=[1, 2]))
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
    assert {s.name: s.macs for s in measured if 'mask_head' not in s.name} == \
        {n: m for n, m in reported.items() if 'mask_head' not in n}


def test_calib_option_overrides_one_field_of_the_hooks_calibration_settings():
    """--calib num_images=2 used to replace the config's calib (its ann_file and img_prefix lost)."""
    import argparse
    sys.path.insert(0, str(REPO / 'tools'))
    import sensitivity_plan
    hook = {'method': 'repq', 'calib': {'ann_file': 'annotations/instances_calib.json', 'img_prefix': 'calib/',
                                        'num_images': 8, 'seed': 3}}
    args = argparse.Namespace(calib={'num_images': 2}, scope=None, method=None)
    config, calib = sensitivity_plan.settings(args, hook)
    assert (calib.ann_file, calib.img_prefix, calib.num_images, calib.seed) == \
        ('annotations/instances_calib.json', 'calib/', 2, 3)
    assert config.method == 'repq'
    _, calib = sensitivity_plan.settings(argparse.Namespace(calib=None, scope=None, method=None), hook)
    assert calib.num_images == 8
