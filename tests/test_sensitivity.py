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
