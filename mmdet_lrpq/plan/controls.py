"""Random bit plans: the control that says whether a mixed-precision plan carries information.

A plan that beats uniform bits may do so because of *which* sites it gives more bits, or merely
because it moves bits at all (a few sites at ``k+1`` paid for by others at ``k-1`` can help by
itself). :func:`random_plan` draws plans that differ from a given plan only in that choice:

* the same sites move: the weighted, unpinned sites of ``movable`` (usually the sites the plan
  scored); every other site keeps the plan's bits, matmuls included;
* the same bit choices: each movable site gets one of the bit-widths the plan gives the movable
  sites (or the given ``levels``), and with ``match_counts`` (default) exactly as many sites get
  each bit-width as in the plan (the same histogram, placed at random);
* the same budget and cost: weight memory ``Σ params·w_bits`` within ``tolerance`` (default: 0.5 %
  of the budget's limit) of the plan's own, and never above the limit; with ``budget.max_bops`` the
  BOPs likewise, within the same fraction of ``max_bops`` of ``min(plan's BOPs, max_bops)`` and at
  most ``max_bops``.

Among the assignments that satisfy all of this, one is drawn by an integer program with i.i.d.
uniform random costs per (site, bits) from ``numpy.random.default_rng(seed)``: deterministic per
seed, different seeds give (almost always) different plans. Site inputs pinned by the quantizer
(``act_bits``) keep their pinned ``a_bits`` as in :func:`~mmdet_lrpq.plan.allocate`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from ..bits import Bits
from .bitplan import BitPlan, format_names
from .budget import Budget, account
from .sites import Site

DEFAULT_TOLERANCE = 0.005


def random_plan(
    sites: Sequence[Site],
    like: Mapping[str, Bits],
    *,
    budget: Budget,
    seed: int,
    movable: Sequence[str] | None = None,
    levels: Sequence[int] | None = None,
    match_counts: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    act_bits: Mapping[str, int] | None = None,
) -> BitPlan:
    """A random plan on ``sites`` controlling for ``like`` (site -> ``(w_bits, a_bits)``, every site).

    ``movable``: the site names whose bits are drawn (default: every weighted site); the others,
    and every matmul, keep ``like``'s bits. The returned plan names every site exactly (no
    catch-all) and records its budget check and accounting like an allocator's plan.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    sites = list(sites)
    act_bits = dict(act_bits or {})
    missing = [s.name for s in sites if s.name not in like]
    if missing:
        raise ValueError(f'the controlled plan assigns no bits to {format_names(missing)}')
    names = {s.name for s in sites}
    wanted = [s.name for s in sites if s.has_weights] if movable is None else list(movable)
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise ValueError(f'movable names site(s) not in the site list: {format_names(unknown)}')
    by_name = {s.name: s for s in sites}
    moving = [by_name[n] for n in dict.fromkeys(wanted) if by_name[n].has_weights and n not in act_bits]
    if not moving:
        raise ValueError('random_plan: no weighted site to move')
    if not 0 <= tolerance < 1:
        raise ValueError(f'tolerance must be in [0, 1), got {tolerance!r}')
    counts = Counter(like[s.name][0] for s in moving)
    levels = sorted(set(counts) if levels is None else {int(b) for b in levels})
    outside = sorted(set(counts) - set(levels))
    if match_counts and outside:
        raise ValueError(f'match_counts: the controlled plan uses bit-widths {outside} outside levels {levels}')
    bits: dict[str, Bits] = {s.name: (like[s.name][0], like[s.name][1]) for s in sites}

    def pinned(name: str, b: int) -> Bits:
        return (b, act_bits.get(name, b))

    target = account(sites, bits)
    limit = budget.limit_bits(sites)
    n, m = len(moving), len(levels)
    moving_names = {s.name for s in moving}
    fixed_bits = sum(s.params * bits[s.name][0] for s in sites if s.has_weights and s.name not in moving_names)
    g = math.gcd(*(s.params for s in moving)) or 1
    memory = np.asarray([s.params // g * b for s in moving for b in levels], dtype=float)
    slack = math.floor(tolerance * limit)
    floor_bits = max(min(target.total_weight_bits, limit) - slack, 0)
    ceiling_bits = min(target.total_weight_bits + slack, limit)
    rows = [
        LinearConstraint(np.kron(np.eye(n), np.ones(m)), 1, 1),
        LinearConstraint(memory[None, :], math.ceil((floor_bits - fixed_bits) / g), (ceiling_bits - fixed_bits) // g),
    ]
    if match_counts:
        rows.append(
            LinearConstraint(np.kron(np.ones(n), np.eye(m)), [counts[b] for b in levels], [counts[b] for b in levels])
        )
    if budget.max_bops is not None:
        budget.require_macs(sites)
        fixed_bops = account([s for s in sites if s.name not in moving_names], bits).bops
        gb = math.gcd(*(s.macs for s in moving)) or 1
        bops = np.asarray([s.macs // gb * b * act_bits.get(s.name, b) for s in moving for b in levels], dtype=float)
        slack_bops = math.floor(tolerance * budget.max_bops)
        floor_bops = max(min(target.bops, budget.max_bops) - slack_bops, 0)
        ceiling_bops = min(target.bops + slack_bops, budget.max_bops)
        rows.append(
            LinearConstraint(
                bops[None, :], math.ceil((floor_bops - fixed_bops) / gb), (ceiling_bops - fixed_bops) // gb
            )
        )
    cost = np.random.default_rng(seed).random(n * m)
    res = milp(cost, integrality=np.ones(n * m), bounds=Bounds(0, 1), constraints=rows)
    if res.status != 0 or res.x is None:
        raise RuntimeError(f'random_plan: no plan found (scipy milp status {res.status}: {res.message})')
    choice = np.rint(res.x).reshape(n, m)
    for s, row in zip(moving, choice):
        bits[s.name] = pinned(s.name, levels[int(np.argmax(row))])
    check = budget.check(sites, bits)
    acc = account(sites, bits)
    if not check.holds or not floor_bits <= acc.total_weight_bits <= ceiling_bits:
        raise RuntimeError(f'random_plan: the rounded solution misses the budget window ({check.to_dict()})')
    record = {
        **budget.to_dict(),
        **check.to_dict(),
        'accounting': acc.to_dict(),
        'control': {
            'seed': seed,
            'levels': levels,
            'match_counts': match_counts,
            'counts': {str(b): counts[b] for b in levels},
            'tolerance': tolerance,
            'controlled_weight_bits': target.total_weight_bits,
            'controlled_bops': target.bops,
            'moved_sites': len(moving),
        },
    }
    return BitPlan(bits, allocator='random', budget=record)


__all__ = ['random_plan', 'DEFAULT_TOLERANCE']
