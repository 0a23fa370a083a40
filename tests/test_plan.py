"""Bit plans, budget accounting and allocators (mmdet_lrpq.plan): pure Python, no torch."""

import itertools
import json
import math
import random

import numpy as np
import pytest

from mmdet_lrpq.plan import ALLOCATORS, PLAN_FORMAT, BitPlan, Budget, Site, account, allocate, plot_plan
from mmdet_lrpq.plan.plot import _columns

SWIN_T_DEPTHS = (2, 2, 6, 2)


def swin_sites(depths=SWIN_T_DEPTHS, embed_dim=96, window=7, image=224, patch_embed=True) -> list[Site]:
    """The sites of an mmdet Swin backbone, in forward order, with Swin-T-like params and MACs."""
    sites = []
    if patch_embed:
        tokens = (image // 4) ** 2
        sites.append(
            Site(
                'patch_embed.projection',
                'conv',
                'patch_embed',
                params=3 * 16 * embed_dim,
                macs=tokens * 3 * 16 * embed_dim,
            )
        )
    g = 0
    for s, depth in enumerate(depths):
        c, n = embed_dim * 2**s, (image // 4 // 2**s) ** 2
        for j in range(depth):
            p = f'stages.{s}.blocks.{j}'
            sites += [
                Site(f'{p}.attn.w_msa.qkv', 'linear', 'qkv', g, s, 3 * c * c, n * 3 * c * c),
                Site(f'{p}.attn.w_msa.matmul1', 'matmul', 'matmul1', g, s, 0, n * window**2 * c),
                Site(f'{p}.attn.w_msa.matmul2', 'matmul', 'matmul2', g, s, 0, n * window**2 * c),
                Site(f'{p}.attn.w_msa.proj', 'linear', 'proj', g, s, c * c, n * c * c),
                Site(f'{p}.ffn.layers.0.0', 'linear', 'fc1', g, s, 4 * c * c, n * 4 * c * c),
                Site(f'{p}.ffn.layers.1', 'linear', 'fc2', g, s, 4 * c * c, n * 4 * c * c),
            ]
            g += 1
        if s < len(depths) - 1:
            sites.append(
                Site(f'stages.{s}.downsample.reduction', 'linear', 'reduction', None, s, 8 * c * c, n // 4 * 8 * c * c)
            )
    return sites


def random_case(rng: random.Random):
    """A random Swin-like site list with random relative-importance scores (some left unscored)."""
    depths = rng.choice([SWIN_T_DEPTHS, (2, 2, 18, 2), tuple(rng.randint(1, 4) for _ in range(4))])
    sites = swin_sites(depths, embed_dim=rng.choice([32, 96, 128]))
    scores = {s.name: rng.random() for s in sites if s.layer_type != 'patch_embed' and rng.random() > 0.05}
    return sites, scores


def weight_memory(sites, bits) -> int:
    return sum(s.params * bits[s.name][0] for s in sites if s.has_weights)


def objective(sites, scores, bits) -> float:
    return sum(scores.get(s.name, 0.0) * bits[s.name][0] for s in sites if s.has_weights)


# ---------------------------------------------------------------------------------------- BitPlan
def test_json_round_trip_preserves_order_and_metadata(tmp_path):
    plan = BitPlan(
        {'z.last': (5, 6), 're:.*\\.qkv': (3, 4), 'a.first': (8, 8), 're:.*': (4, 4)},
        scores={'z.last': 0.25, 'a.first': 1.0 / 3},
        allocator='lrp_qvit',
        budget={'weight_bits': 4, 'accounting': {'avg_weight_bits': 3.9990234375, 'bops': 10**15}},
        source={'model': 'swin_tiny_patch4_window7_224', 'images': [3, 1, 2]},
        command='python tools/x.py',
    )
    path = tmp_path / 'plan.json'
    plan.save(path)
    text = path.read_text()
    data = json.loads(text)
    assert data['format'] == PLAN_FORMAT
    assert list(data['bits']) == ['z.last', 're:.*\\.qkv', 'a.first', 're:.*']
    assert data['bits']['z.last'] == [5, 6]
    assert '"z.last": [5, 6],' in text and text.startswith('{\n  "format"')  # one entry per line, indent 2
    loaded = BitPlan.load(path)
    assert loaded == plan
    assert list(loaded.bits.items()) == [
        ('z.last', (5, 6)),
        ('re:.*\\.qkv', (3, 4)),
        ('a.first', (8, 8)),
        ('re:.*', (4, 4)),
    ]
    assert loaded.scores == {'z.last': 0.25, 'a.first': 1.0 / 3}
    assert loaded.budget['accounting']['bops'] == 10**15
    assert (loaded.allocator, loaded.command, loaded.source['images']) == ('lrp_qvit', 'python tools/x.py', [3, 1, 2])
    items = list(plan.bits.items())
    reordered = BitPlan(
        dict([items[1], items[0], *items[2:]]),
        scores=plan.scores,
        allocator='lrp_qvit',
        budget=plan.budget,
        source=plan.source,
        command=plan.command,
    )
    assert reordered != plan  # order is part of a plan's meaning


def test_plans_that_cannot_mean_what_they_say_are_errors(tmp_path):
    """Entries after the catch-all, patterns an earlier one shadows, duplicate JSON keys."""
    with pytest.raises(ValueError, match=r"after the catch-all 're:\.\*' are never used.*'re:.*fc1'"):
        BitPlan({'re:.*': (4, 4), 're:.*fc1': (6, 6), 'exact.name': (5, 5)})
    plan = BitPlan({'re:blocks\\..*': (5, 5), 're:blocks\\.0\\..*': (8, 8), 're:.*': (4, 4)})
    with pytest.raises(
        ValueError,
        match=r'1 pattern\(s\) decide no site because an earlier pattern decides every '
        r"site they match: re:blocks\\.0\\..\* \(by 're:blocks",
    ):
        plan.validate(['blocks.0.qkv', 'blocks.1.qkv', 'head'])
    # a fallback every site of this model has an exact key for is not an error (backbone-only scope)
    BitPlan({'blocks.0.qkv': (5, 5), 're:.*': (4, 4)}).validate(['blocks.0.qkv'])
    path = tmp_path / 'dupes.json'
    path.write_text('{"format": "mmdet-lrpq/bitplan@1", "bits": {"a": [4, 4], "b": [5, 5], "a": [8, 8]}}')
    with pytest.raises(ValueError, match=rf"{path}: duplicate JSON key\(s\) 'a'"):
        BitPlan.load(path)
    binary = tmp_path / 'plan.pth'
    binary.write_bytes(b'PK\x03\x04\xff\xfe')
    with pytest.raises(ValueError, match='not a text'):
        BitPlan.load(binary)


def test_a_plan_made_for_one_architecture_is_refused_on_another():
    plan = BitPlan({'re:.*': (4, 4)}, architecture={'family': 'swin', 'embed_dims': 96, 'depths': [2, 2, 6, 2]})
    plan.check_architecture({'family': 'swin', 'embed_dims': 96, 'depths': (2, 2, 6, 2), 'window_size': 7})
    with pytest.raises(
        ValueError,
        match=r'another architecture than the backbone \(depths: plan \[2, 2, 6, 2\] vs '
        r'model \[2, 2, 18, 2\]\)',
    ):
        plan.check_architecture({'family': 'swin', 'embed_dims': 96, 'depths': [2, 2, 18, 2]}, where='the backbone')
    BitPlan({'re:.*': (4, 4)}).check_architecture({'depths': [1]})  # hand-written: nothing recorded
    assert BitPlan.from_dict(plan.to_dict()).architecture == plan.architecture


def test_non_finite_metadata_is_written_as_null(tmp_path):
    plan = BitPlan({'a': (4, 4)}, budget={'accounting': {'avg_act_bits_mac_weighted': math.nan}})
    plan.save(tmp_path / 'p.json')
    assert json.loads((tmp_path / 'p.json').read_text())['budget']['accounting'] == {'avg_act_bits_mac_weighted': None}


def test_exact_key_beats_patterns_and_first_pattern_wins():
    plan = BitPlan({'re:.*qkv': (3, 3), 're:stages\\.0\\..*': (5, 5), 'stages.0.blocks.0.qkv': (7, 8), 're:.*': (4, 6)})
    assert plan.resolve(
        [
            'stages.0.blocks.0.qkv',
            'stages.0.blocks.1.qkv',
            'stages.0.blocks.1.proj',
            'stages.1.blocks.0.proj',
            'qkv_not_at_end.x',
        ]
    ) == {
        'stages.0.blocks.0.qkv': (7, 8),  # exact, although two patterns listed earlier match too
        'stages.0.blocks.1.qkv': (3, 3),  # first matching pattern in file order
        'stages.0.blocks.1.proj': (5, 5),
        'stages.1.blocks.0.proj': (4, 6),
        'qkv_not_at_end.x': (4, 6),
    }  # patterns must match the whole name
    assert BitPlan.uniform(5, 6).resolve(['a', 'b.c']) == {'a': (5, 6), 'b.c': (5, 6)}


def test_resolve_refuses_uncovered_sites():
    with pytest.raises(ValueError, match=r"covers no entry for 1 site\(s\): 'neck.conv'.*with_default"):
        BitPlan({'backbone.qkv': (4, 4)}).resolve(['backbone.qkv', 'neck.conv'])


def test_validate_lists_each_kind_of_mismatch():
    sites = swin_sites((1, 1), embed_dim=8)
    names = [s.name for s in sites]
    plan = BitPlan(
        {
            'stages.9.blocks.0.attn.w_msa.qkv': (5, 5),
            'nonexistent.fc': (3, 3),
            're:stages\\.0\\..*': (4, 4),
            're:neck\\..*': (4, 4),
            're:.*qkv': (6, 6),
        }
    )
    with pytest.raises(ValueError) as e:
        plan.validate(sites)
    msg = str(e.value)
    assert "2 exact key(s) name no site of this model: 'stages.9.blocks.0.attn.w_msa.qkv', 'nonexistent.fc'" in msg
    assert "1 pattern(s) match no site: 're:neck\\\\..*'" in msg
    uncovered = [n for n in names if not n.startswith('stages.0.') and not n.endswith('qkv')]
    assert uncovered == [
        'patch_embed.projection',
        'stages.1.blocks.0.attn.w_msa.matmul1',
        'stages.1.blocks.0.attn.w_msa.matmul2',
        'stages.1.blocks.0.attn.w_msa.proj',
        'stages.1.blocks.0.ffn.layers.0.0',
        'stages.1.blocks.0.ffn.layers.1',
    ]
    assert f'6 site(s) are matched by no entry: {", ".join(map(repr, uncovered))}' in msg
    assert 'BitPlan.rename' in msg and 'BitPlan.with_default' in msg
    with pytest.raises(ValueError) as e:  # a fallback covers the sites; the other problems remain
        plan.with_default(4, 4).validate(sites)
    assert 'matched by no entry' not in str(e.value) and 'name no site' in str(e.value)
    # a plan that fits is silent, and a catch-all shadowed by exact keys is not "unused"
    BitPlan({**{n: (4, 4) for n in names}, 're:.*': (4, 4)}).validate(sites)


def test_validate_truncates_long_lists():
    plan = BitPlan({f'missing.{i}': (4, 4) for i in range(12)})
    with pytest.raises(ValueError, match=r"'missing\.9', \.\.\. \(12 in all\)") as e:
        plan.validate(['a'])
    assert "'missing.10'" not in str(e.value)


@pytest.mark.parametrize('bad', [(1, 4), (4, 9), (4.0, 4), (True, 4), ('4', 4), (4,), (4, 4, 4), 4, '44'])
def test_bits_out_of_range_or_malformed_are_rejected(bad):
    with pytest.raises(ValueError, match=r"bit plan entry 'stages\.0\.qkv'"):
        BitPlan({'stages.0.qkv': bad})


def test_bits_assignment_is_checked_and_bits_view_is_read_only():
    plan = BitPlan.uniform(4, 4)
    with pytest.raises(ValueError, match=r"'x': a_bits must be an integer in 2\.\.8, got 9"):
        plan.bits = {'x': (4, 9), **plan.bits}
    with pytest.raises(TypeError):
        plan.bits['x'] = (4, 4)
    plan.bits = {'x': [np.int64(3), 5], **plan.bits}
    assert plan.bits == {'x': (3, 5), 're:.*': (4, 4)} and type(plan.bits['x'][0]) is int


def test_invalid_pattern_and_scores_are_rejected():
    with pytest.raises(ValueError, match=r"'re:stages\.\(': invalid regular expression"):
        BitPlan({'re:stages.(': (4, 4)})
    with pytest.raises(ValueError, match=r"scores must be finite numbers; got 'a=nan'"):
        BitPlan(scores={'a': math.nan, 'b': 1.0})


def test_load_rejects_other_formats(tmp_path):
    path = tmp_path / 'plan.json'
    path.write_text(json.dumps({'format': 'mmdet-lrpq/bitplan@2', 'bits': {}}))
    with pytest.raises(
        ValueError,
        match=r"not an mmdet-lrpq bit plan: format is 'mmdet-lrpq/bitplan@2', "
        r"expected 'mmdet-lrpq/bitplan@1'",
    ):
        BitPlan.load(path)
    path.write_text(json.dumps({'re:.*': [4, 4]}))
    with pytest.raises(ValueError, match='format is None'):
        BitPlan.load(path)
    path.write_text(json.dumps({'format': PLAN_FORMAT, 'bits': {}, 'bitz': {}}))
    with pytest.raises(ValueError, match=r"unknown field\(s\) 'bitz'"):
        BitPlan.load(path)
    path.write_text('{"format": ')
    with pytest.raises(ValueError, match='not valid JSON'):
        BitPlan.load(path)


def test_rename_maps_exact_keys_and_scores_keeps_patterns():
    plan = BitPlan(
        {'layers.0.blocks.0.attn.qkv': (5, 5), 'head.fc': (8, 8), 're:layers\\..*': (3, 3)},
        scores={'layers.0.blocks.0.attn.qkv': 0.5, 'head.fc': 0.1},
        allocator='greedy',
        budget={'weight_bits': 4},
        command='cmd',
    )
    renamed = plan.rename(lambda n: None if n.startswith('head') else n.replace('layers.', 'stages.'))
    assert list(renamed.bits.items()) == [('stages.0.blocks.0.attn.qkv', (5, 5)), ('re:layers\\..*', (3, 3))]
    assert renamed.scores == {'stages.0.blocks.0.attn.qkv': 0.5}
    assert (renamed.allocator, renamed.budget, renamed.command) == ('greedy', {'weight_bits': 4}, 'cmd')
    assert 'head.fc' in plan.bits  # the original is untouched
    with pytest.raises(ValueError, match="rename maps bit plan keys 'layers.0.blocks.0.attn.qkv' and 'head.fc' both"):
        plan.rename(lambda n: 'same')


def test_with_default_appends_a_single_catch_all_last():
    plan = BitPlan({'re:.*': (6, 6), 'backbone.qkv': (5, 5)}).with_default(4, 4)
    assert list(plan.bits.items()) == [('backbone.qkv', (5, 5)), ('re:.*', (4, 4))]
    assert plan.resolve(['backbone.qkv', 'neck.lateral_convs.0.conv']) == {
        'backbone.qkv': (5, 5),
        'neck.lateral_convs.0.conv': (4, 4),
    }


# ---------------------------------------------------------------------------------------- budget
def three_sites():
    return [
        Site('fc', 'linear', params=100, macs=1000),
        Site('conv', 'conv', params=50, macs=500),
        Site('mm', 'matmul', 'matmul1', block=0, macs=200),
    ]


def test_accounting_by_hand():
    bits = {'fc': (4, 6), 'conv': (8, 8), 'mm': (2, 5)}  # a matmul's w_bits mean nothing
    acc = account(three_sites(), bits)
    assert acc.params == 150
    assert acc.total_weight_bits == 100 * 4 + 50 * 8 == 800
    assert acc.weight_mb == 800 / 8 / 2**20
    assert acc.avg_weight_bits == 800 / 150
    assert acc.avg_act_bits == (6 + 8 + 5) / 3
    assert acc.avg_act_bits_mac_weighted == (1000 * 6 + 500 * 8 + 200 * 5) / 1700
    assert acc.macs == 1700
    assert acc.bops == 1000 * 4 * 6 + 500 * 8 * 8 + 200 * 5 * 5 == 61000  # matmul: a·a
    assert acc.to_dict()['bops'] == 61000 and acc.n_sites == 3
    assert math.isnan(account([Site('x', 'linear', params=4)], {'x': (4, 4)}).avg_act_bits_mac_weighted)
    with pytest.raises(ValueError, match=r"no bits assigned to 1 site\(s\): 'conv'"):
        account(three_sites(), {'fc': (4, 4), 'mm': (4, 4)})


def test_budget_check_is_exact():
    sites, bits = three_sites(), {'fc': (4, 6), 'conv': (8, 8), 'mm': (8, 8)}
    ok = Budget(weight_bits=5.4).check(sites, bits)  # limit floor(5.4 * 150) = 810
    assert (ok.holds, ok.used_bits, ok.limit_bits, ok.margin_bits) == (True, 800, 810, 10)
    tight = Budget(weight_bits=5.3).check(sites, bits)  # limit 795
    assert (bool(tight), tight.margin_bits) == (False, -5)
    # 4.1 means 41/10: in binary floating point 4.1 * 10 is 40.99999999999999...
    one = [Site('w', 'linear', params=10)]
    assert Budget(4.1).check(one, {'w': (4, 4)}).limit_bits == 41
    assert Budget(4.1).check(one, {'w': (4, 4)}).margin_bits == 1
    huge = [Site(f'w{i}', 'linear', params=10**12 + i) for i in range(3)]
    check = Budget(7).check(huge, {s.name: (8, 8) for s in huge})
    assert check.used_bits == 8 * (3 * 10**12 + 3) and check.margin_bits == -(3 * 10**12 + 3)
    for bad in (0, -1, math.inf, math.nan, True, '4'):
        with pytest.raises(ValueError, match='weight_bits must be a positive finite number'):
            Budget(bad)


# ---------------------------------------------------------------------------------------- allocators
def check_plan(plan, sites, k, fixed=None):
    """Invariants every allocator's plan satisfies (see mmdet_lrpq.plan.allocators)."""
    fixed = fixed or {}
    assert list(plan.bits) == [s.name for s in sites]
    bits = plan.resolve(sites)
    assert weight_memory(sites, bits) <= k * sum(s.params for s in sites)  # no more than uniform k
    assert Budget(k).check(sites, bits).holds
    allowed = {min(max(b, 2), 8) for b in (k - 1, k, k + 1)}
    for s in sites:
        w, a = bits[s.name]
        if s.name in fixed:
            assert (w, a) == fixed[s.name]
            continue
        assert w == a and w in allowed, (s.name, w, a)
        if not s.has_weights and plan.allocator != 'uniform':
            assert w == min(k + 1, 8) if s.block in (0, 1) else w == k
    assert plan.budget['accounting'] == account(sites, bits).to_dict()
    assert plan.budget['weight_bits'] == k and plan.budget['target_bits'] == k
    assert plan.budget['holds'] and plan.budget['used_bits'] == weight_memory(sites, bits)
    return bits


def allocator_inputs(name, sites, scores, k):
    """``allocate``'s ranking input: the scores, or for ``sensitivity`` a measured-cost table made
    from them (cost falls with bits, and faster for a higher score), for the sites with weights."""
    if name != 'sensitivity':
        return dict(scores=scores)
    levels = {min(max(b, 2), 8) for b in (k - 1, k, k + 1)}
    weighted = {s.name for s in sites if s.has_weights}
    return dict(sensitivity={n: {b: v * 4.0**-b for b in levels} for n, v in scores.items() if n in weighted})


@pytest.mark.parametrize('name', sorted(ALLOCATORS))
def test_allocators_meet_the_budget_on_random_swin_like_models(name):
    rng = random.Random(sorted(ALLOCATORS).index(name))
    cases = 12 if name == 'ilp' else 25
    for _ in range(cases):
        sites, scores = random_case(rng)
        for k in range(3, 8):
            fixed = {'patch_embed.projection': (k, 8)} if rng.random() < 0.5 else None
            inputs = allocator_inputs(name, sites, scores, k)
            plan = allocate(name, sites, target_bits=k, fixed=fixed, **inputs)
            assert plan.allocator == name
            bits = check_plan(plan, sites, k, fixed)
            ranked = inputs.get('scores') or {n: costs[k] for n, costs in inputs['sensitivity'].items()}
            assert plan.scores == {s.name: ranked[s.name] for s in sites if s.name in ranked}
            if name != 'uniform':  # the mixed-precision allocators use the budget they are given
                assert plan.budget['margin_bits'] < max(s.params for s in sites)
            for s in sites:  # unscored sites are held at k (lrp_qvit's blocks 0-1 need no score)
                if s.has_weights and s.name not in ranked and s.name not in (fixed or {}):
                    early = name == 'lrp_qvit' and s.block in (0, 1)
                    assert bits[s.name] == ((k + 1, k + 1) if early else (k, k))


def test_uniform_is_k_everywhere_except_pinned():
    sites = swin_sites()
    plan = allocate('uniform', sites, target_bits=4, fixed={'patch_embed.projection': (4, 8)})
    bits = plan.resolve(sites)
    assert bits.pop('patch_embed.projection') == (4, 8)
    assert set(bits.values()) == {(4, 4)}
    assert plan.budget['margin_bits'] == 0 and plan.budget['pinned'] == {'patch_embed.projection': [4, 8]}


def droppable(s: Site) -> bool:
    return s.has_weights and (s.layer_type == 'reduction' or (s.block is not None and s.block >= 2))


@pytest.mark.parametrize('k', range(3, 8))
def test_lrp_qvit_rule(k):
    rng = random.Random(k)
    for _ in range(10):
        sites, scores = random_case(rng)
        scores = {s.name: rng.random() for s in sites}  # every site scored, distinct scores
        fixed = {'patch_embed.projection': (k, 8)}
        plan = allocate('lrp_qvit', sites, scores, target_bits=k, fixed=fixed)
        bits = check_plan(plan, sites, k, fixed)
        early = [s for s in sites if s.block in (0, 1)]
        assert len(early) == 12 and all(bits[s.name] == (k + 1, k + 1) for s in early)
        later = [s for s in sites if droppable(s)]
        dropped = [s for s in later if bits[s.name][0] == k - 1]
        kept = [s for s in later if bits[s.name][0] == k]
        assert len(dropped) + len(kept) == len(later) and dropped and kept
        assert max(scores[s.name] for s in dropped) < min(scores[s.name] for s in kept)
        # minimal: the most important dropped site could not have stayed at k
        last = max(dropped, key=lambda s: scores[s.name])
        assert not Budget(k).check(sites, {**bits, last.name: (k, k)}).holds
        others = [s for s in sites if s.block is None and s.layer_type != 'reduction' and s.name not in fixed]
        assert all(bits[s.name] == (k, k) for s in others)


def test_lrp_qvit_breaks_score_ties_by_name_and_drops_unscored_sites_never():
    sites = swin_sites((2, 2), embed_dim=8, patch_embed=False)
    scores = {s.name: 0.5 for s in sites if droppable(s)}
    unscored = 'stages.0.downsample.reduction'  # first by name, but without a score
    del scores[unscored]
    scores['stages.0.blocks.0.attn.w_msa.qkv'] = 0.0  # early blocks rise whatever their score
    bits = allocate('lrp_qvit', sites, scores, target_bits=4).resolve(sites)
    assert bits['stages.0.blocks.0.attn.w_msa.qkv'] == (5, 5) and bits[unscored] == (4, 4)
    # blocks 0-1 cost 2·12·8² = 1536 extra bits; by name, stage 1 proj (256), qkv (768), fc1 (1024) pay
    later = sorted(n for n in scores if n.startswith('stages.1.'))
    assert (
        [n for n in later if bits[n][0] == 3]
        == later[:3]
        == ['stages.1.blocks.0.attn.w_msa.proj', 'stages.1.blocks.0.attn.w_msa.qkv', 'stages.1.blocks.0.ffn.layers.0.0']
    )


def test_greedy_matches_the_repeated_best_ratio_rule_and_is_deterministic():
    rng = random.Random(7)
    for _ in range(20):
        sites = [Site(f's{i}', 'linear', params=rng.randint(1, 50)) for i in range(rng.randint(2, 9))]
        scores = {s.name: rng.choice([0.1, 0.5, rng.random()]) for s in sites}
        k = rng.randint(3, 7)
        budget = Budget(weight_bits=k + rng.uniform(-0.9, 0.9))
        plan = allocate('greedy', sites, scores, target_bits=k, budget=budget)
        # reference: raise one bit at a time, always the best score/params that still fits
        bits = {s.name: k - 1 for s in sites}
        limit = math.floor(budget.exact_weight_bits * sum(s.params for s in sites))
        while True:
            used = sum(s.params * bits[s.name] for s in sites)
            fits = [s for s in sites if bits[s.name] < k + 1 and used + s.params <= limit]
            if not fits:
                break
            best = min(fits, key=lambda s: (-scores[s.name] / s.params, s.name))
            bits[best.name] += 1
        assert plan.resolve(sites) == {n: (b, b) for n, b in bits.items()}
        shuffled = rng.sample(sites, len(sites))
        again = allocate('greedy', shuffled, scores, target_bits=k, budget=budget)
        assert again.resolve(sites) == plan.resolve(sites)


def brute_force(sites, scores, k, budget):
    """Best Σ score·bits over every choice in {k-1, k, k+1}^n within the budget."""
    levels = np.array([k - 1, k, k + 1])
    choices = np.array(list(itertools.product(range(3), repeat=len(sites))))
    b = levels[choices]
    params = np.array([s.params for s in sites])
    feasible = b @ params <= budget.limit_bits(sites)
    return (b @ np.array([scores[s.name] for s in sites]))[feasible].max()


def test_ilp_equals_brute_force_and_beats_greedy():
    rng = random.Random(11)
    for trial in range(30):
        sites = [
            Site(f's{i}', 'linear', params=rng.randint(1, 10 ** rng.randint(1, 6))) for i in range(rng.randint(1, 8))
        ]
        scores = {s.name: rng.random() for s in sites}
        k = rng.randint(3, 7)
        budget = Budget(weight_bits=k + rng.choice([0, 0.25, -0.5, 0.8]))
        plan = allocate('ilp', sites, scores, target_bits=k, budget=budget)
        bits = plan.resolve(sites)
        assert budget.check(sites, bits).holds
        best = brute_force(sites, scores, k, budget)
        assert objective(sites, scores, bits) == pytest.approx(best, rel=1e-12), trial
        greedy = allocate('greedy', sites, scores, target_bits=k, budget=budget).resolve(sites)
        assert objective(sites, scores, greedy) <= best + 1e-12


def test_ilp_pins_and_matmuls_are_not_variables():
    sites = [
        Site('a', 'linear', params=10),
        Site('b', 'linear', params=10),
        Site('big', 'linear', params=30),
        Site('mm', 'matmul', 'matmul1', block=5),
    ]
    # budget 4·50 = 200 bits; 'big' pinned at 5 uses 150, and a, b need at least 2·3·10 = 60
    with pytest.raises(ValueError, match='impossible budget'):
        allocate('ilp', sites, {'a': 1.0, 'b': 2.0}, target_bits=4, fixed={'big': (5, 5)})
    plan = allocate('ilp', sites, {'a': 1.0, 'b': 2.0}, target_bits=4, fixed={'big': (3, 8)})
    # 'big' uses 90 of 200: 110 left, enough for a and b at the top level (5)
    assert plan.resolve(sites) == {'a': (5, 5), 'b': (5, 5), 'big': (3, 8), 'mm': (4, 4)}
    # 80 left: a + b <= 8 bits; 1·a + 2·b is best at b = 5, a = 3
    plan = allocate('ilp', sites, {'a': 1.0, 'b': 2.0}, target_bits=4, fixed={'big': (4, 4)})
    assert plan.resolve(sites) == {'a': (3, 3), 'b': (5, 5), 'big': (4, 4), 'mm': (4, 4)}


@pytest.mark.parametrize('name', sorted(ALLOCATORS))
def test_impossible_budgets_raise(name):
    sites = swin_sites((2, 2, 2, 2), embed_dim=32)
    scores = {s.name: 1.0 for s in sites}
    with pytest.raises(ValueError, match=r'impossible budget .*needs \d+ bits'):
        allocate(name, sites, target_bits=4, budget=Budget(weight_bits=2.9), **allocator_inputs(name, sites, scores, 4))
    biggest = max(sites, key=lambda s: s.params)
    tiny = [biggest, Site('small', 'linear', 'fc1', block=3, params=1)]
    with pytest.raises(ValueError, match='Pinned sites use .* bits, more than the whole budget'):
        allocate(
            name, tiny, target_bits=3, fixed={biggest.name: (8, 8)}, **allocator_inputs(name, tiny, {'small': 1.0}, 3)
        )


def test_lrp_qvit_at_two_bits_cannot_pay_for_its_early_blocks():
    sites = swin_sites((2, 2), embed_dim=8)
    with pytest.raises(ValueError, match=r'impossible budget for allocator .lrp_qvit.'):
        allocate('lrp_qvit', sites, {s.name: 1.0 for s in sites}, target_bits=2)


def test_bad_allocator_inputs_are_rejected():
    sites = swin_sites((1, 1), embed_dim=8)
    with pytest.raises(
        ValueError, match="unknown allocator 'hawq'; available: 'uniform', 'lrp_qvit', 'greedy', 'ilp', 'sensitivity'"
    ):
        allocate('hawq', sites, {}, target_bits=4)
    with pytest.raises(ValueError, match=r"scores name 1 site\(s\) not in the site list: 'layers.0.blocks.0.attn.qkv'"):
        allocate('greedy', sites, {'layers.0.blocks.0.attn.qkv': 1.0}, target_bits=4)
    with pytest.raises(ValueError, match=r"fixed name 1 site\(s\) not in the site list: 'nope'"):
        allocate('uniform', sites, {}, target_bits=4, fixed={'nope': (8, 8)})
    with pytest.raises(ValueError, match=r"bit plan entry \"fixed\['patch_embed.projection'\]\": a_bits"):
        allocate('uniform', sites, {}, target_bits=4, fixed={'patch_embed.projection': (4, 16)})
    with pytest.raises(ValueError, match='target_bits must be an integer in 2..8, got 9'):
        allocate('uniform', sites, {}, target_bits=9)
    with pytest.raises(ValueError, match="allocator 'ilp' ranks sites by score, but no unpinned site"):
        allocate('ilp', sites, {'stages.0.blocks.0.attn.w_msa.matmul1': 1.0}, target_bits=4)
    with pytest.raises(ValueError, match="site names must be unique; repeated: 'patch_embed.projection'"):
        allocate('uniform', sites + sites[:1], {}, target_bits=4)
    with pytest.raises(TypeError):
        allocate('greedy', sites, {s.name: 1.0 for s in sites}, target_bits=4, time_limit=3)


def test_allocated_plan_round_trips_and_extends_to_a_detector(tmp_path):
    sites = swin_sites()
    scores = {s.name: (i * 37 % 101) / 101 for i, s in enumerate(sites)}
    plan = allocate('lrp_qvit', sites, scores, target_bits=4, fixed={'patch_embed.projection': (4, 8)})
    plan.source, plan.command = {'model': 'swin_tiny'}, 'python tools/lrp_plan.py --target mp4'
    plan = plan.rename(lambda n: 'backbone.' + n).with_default(4, 4)
    plan.save(tmp_path / 'mp4.json')
    loaded = BitPlan.load(tmp_path / 'mp4.json')
    assert loaded == plan
    detector = [Site('backbone.' + s.name, s.kind, s.layer_type, s.block, s.stage, s.params, s.macs) for s in sites]
    detector.append(Site('neck.lateral_convs.0.conv', 'conv', params=96 * 256))
    loaded.validate(detector)
    bits = loaded.resolve(detector)
    assert bits['neck.lateral_convs.0.conv'] == (4, 4)
    assert Budget(4).check(detector, bits).holds  # k-bit extras keep a k-bit budget
    acc = account(detector, bits)
    assert 3.9 < acc.avg_weight_bits <= 4 and acc.params == sum(s.params for s in sites) + 96 * 256


# ---------------------------------------------------------------------------------------- plot
def test_plot_columns_put_patch_merging_between_stages():
    columns, col_of = _columns(swin_sites())
    labels = [(kind, i) for kind, i, _ in columns]
    assert labels[:6] == [('block', 0), ('block', 1), ('merge', 0), ('block', 2), ('block', 3), ('merge', 1)]
    assert len(columns) == 12 + 3
    assert col_of['stages.2.downsample.reduction'] == 12 and col_of['stages.3.blocks.0.ffn.layers.1'] == 13
    assert 'patch_embed.projection' not in col_of


def test_plot_plan_writes_a_png(tmp_path):
    pytest.importorskip('matplotlib')
    sites = swin_sites()
    scores = {s.name: (i * 13 % 17) / 17 for i, s in enumerate(sites)}
    plan = allocate('lrp_qvit', sites, scores, target_bits=4)
    out = plot_plan(plan, sites, tmp_path / 'plan.png')
    data = out.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 10_000


# ----------------------------------------------------------------------------- placeholder plans, recorded paths
def test_placeholder_reason_names_random_init_plans():
    assert BitPlan.uniform(4, 4).placeholder_reason() is None
    plan = BitPlan({'re:.*': (4, 4)}, source={'weights': {'kind': 'random-init', 'seed': 0}})
    assert "'random-init'" in plan.placeholder_reason()
    assert BitPlan({'re:.*': (4, 4)}, source={'weights': {'kind': 'checkpoint'}}).placeholder_reason() is None


def test_shipped_plans_record_no_path_outside_the_repository():
    """source.images.folder and the command were '../shared/data/...': a path on the maker's machine."""
    from pathlib import Path

    plans = sorted((Path(__file__).resolve().parents[1] / 'configs' / 'plans').glob('swin_*_mp*.json'))
    assert len(plans) == 4
    for path in plans:
        data = json.loads(path.read_text())
        recorded = [data['source']['images']['folder'], *data['command'].split()]
        outside = [p for p in recorded if p.startswith(('/', '..', "'/", "'..")) or '/../' in p]
        assert not outside, (path.name, outside)
        assert data['source']['images']['folder'] == '<outside-repo>/imagenet_sample/val'
