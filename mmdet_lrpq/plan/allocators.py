"""Bit allocators behind one interface, so they can be compared on the same budget (docs/method.md).

``allocate(name, sites, scores, target_bits=k)`` returns a :class:`BitPlan` with an exact entry
for every given site, in site order. Rules shared by every allocator:

* Allowed bits per site: ``{k-1, k, k+1}`` clipped to 2..8; a site's ``a_bits`` equals its
  ``w_bits`` (for a matmul, both are its operand bits).
* ``fixed`` pins sites (e.g. the patch embedding at ``(k, 8)``): they count toward the budget and
  are never changed. ``act_bits`` pins only a site's input bits (the quantizer keeps the image
  input of the patch embedding at 8 whatever the plan says): its weight bits still move, and the
  plan and its BOPs carry the pinned ``a_bits``.
* Matmul sites carry no weights, so a weight budget cannot trade them against anything: except in
  ``uniform``, they get ``k+1`` in blocks 0 and 1 (as the LRP-QViT rule gives those blocks) and
  ``k`` elsewhere.
* Only sites with a score can be ranked, so only they are moved: a weighted site without a score
  is held at ``k`` (``lrp_qvit`` still raises blocks 0-1, a positional rule that needs no score).
  Scores naming no given site are an error (usually a plan in another naming scheme).
* The default budget is ``Budget(weight_bits=k)`` over the given sites. The result is checked
  with :meth:`Budget.check`; an impossible budget raises ``ValueError`` before any search.

``ilp`` and ``sensitivity`` share one integer program (one binary per site and allowed bits, the
budget as one integer row): ``ilp`` maximizes ``Σ score·bits``; ``sensitivity`` minimizes the
measured ``Σ sensitivity(site, bits)`` (e.g. :func:`mmdet_lrpq.models.fisher.fisher_sensitivity`),
given as ``sensitivity=`` instead of scores. A budget with ``max_bops`` adds the BOPs as a second
row; only these two allocators take one (the rule-based ones budget weight memory only).
LampQ's type-aware normalisation of the table and its iterative re-measure/re-solve loop are
options around ``sensitivity``: :func:`mmdet_lrpq.plan.lampq.allocate_lampq`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..bits import MAX_BITS, MIN_BITS, Bits, check_bit_pair
from .bitplan import BitPlan, check_scores, format_names
from .budget import Budget, account
from .sites import Site

EARLY_BLOCKS = (0, 1)  # LRP-QViT gives the first two transformer blocks k+1 bits


def _clip(bits: int) -> int:
    return min(max(bits, MIN_BITS), MAX_BITS)


@dataclass
class _Problem:
    """The validated inputs of one allocation."""

    sites: list[Site]
    scores: dict[str, float]
    k: int
    budget: Budget
    fixed: dict[str, Bits]
    allocator: str
    sensitivity: dict[str, dict[int, float]]
    act_pins: dict[str, int] = field(default_factory=dict)

    def pin(self, bits: Mapping[str, Bits]) -> dict[str, Bits]:
        """``bits`` with the pinned input bits of ``act_pins`` (what the quantizer will run)."""
        return {n: (w, self.act_pins.get(n, a)) for n, (w, a) in bits.items()}

    def act(self, site: Site, bits: int) -> int:
        return self.act_pins.get(site.name, bits)

    @property
    def low(self) -> int:
        return _clip(self.k - 1)

    @property
    def high(self) -> int:
        return _clip(self.k + 1)

    def levels(self) -> list[int]:
        return sorted({self.low, self.k, self.high})

    def base(self) -> dict[str, Bits]:
        """Pinned sites as pinned; matmuls k+1 in blocks 0-1, else k; weighted sites at k."""
        out = {}
        for s in self.sites:
            if s.name in self.fixed:
                out[s.name] = self.fixed[s.name]
            else:
                b = self.high if not s.has_weights and s.block in EARLY_BLOCKS else self.k
                out[s.name] = (b, b)
        return out

    def adjustable(self) -> list[Site]:
        """Sites an allocator may move: with weights, not pinned, scored."""
        return [s for s in self.sites if s.has_weights and s.name not in self.fixed and s.name in self.scores]

    def require_feasible(self, lowest: Mapping[str, Bits], rule: str) -> None:
        """Raise a ValueError explaining why, if even ``lowest`` (the cheapest plan the rule allows) fails."""
        check = self.budget.check(self.sites, self.pin(lowest))
        if check.holds:
            return
        if check.margin_bits >= 0:  # the memory fits: the BOPs do not
            assert check.used_bops is not None and check.limit_bops is not None
            raise ValueError(
                f'impossible budget for allocator {self.allocator!r}: max_bops={check.limit_bops} BOPs per image, '
                f'but even the cheapest plan the rule allows ({rule}) needs {check.used_bops} '
                f'({check.used_bops / check.limit_bops:.3f}x). Raise Budget.max_bops or pin fewer sites high.'
            )
        pinned = sum(s.params * self.fixed[s.name][0] for s in self.sites if s.has_weights and s.name in self.fixed)
        unscored = [
            s.name for s in self.sites if s.has_weights and s.name not in self.fixed and s.name not in self.scores
        ]
        params = sum(s.params for s in self.sites if s.has_weights)
        msg = (
            f'impossible budget for allocator {self.allocator!r}: Budget(weight_bits={self.budget.weight_bits}) '
            f'allows {check.limit_bits} bits of weight memory over these {len(self.sites)} sites '
            f'({params} weights), but even the cheapest plan the rule allows ({rule}) needs '
            f'{check.used_bits} bits ({check.used_bits / max(params, 1):.3f} bits per weight). '
            f'Pinned sites use {pinned} bits'
            f'{", more than the whole budget" if pinned > check.limit_bits else ""}.'
        )
        if unscored:
            msg += (
                f' {len(unscored)} weighted site(s) have no score and are held at {self.k} bits: '
                f'{format_names(unscored)}.'
            )
        raise ValueError(msg + ' Raise Budget.weight_bits, pin fewer sites or pin them lower, or score more sites.')


def _uniform(p: _Problem) -> dict[str, Bits]:
    bits = {s.name: p.fixed.get(s.name, (p.k, p.k)) for s in p.sites}
    p.require_feasible(bits, f'every site at {p.k} bits')
    return bits


def _lrp_qvit(p: _Problem) -> dict[str, Bits]:
    """Blocks 0-1 at k+1; the least important later-block/reduction sites drop to k-1 until it fits.

    Sites drop in increasing score, ties broken by name; the first assignment that fits is kept.
    """
    bits = p.base()
    for s in p.sites:
        if s.name not in p.fixed and s.block in EARLY_BLOCKS:
            bits[s.name] = (p.high, p.high)
    droppable = sorted(
        (
            s
            for s in p.adjustable()
            if (s.block is not None and s.block not in EARLY_BLOCKS) or s.layer_type == 'reduction'
        ),
        key=lambda s: (p.scores[s.name], s.name),
    )
    p.require_feasible(
        {**bits, **{s.name: (p.low, p.low) for s in droppable}},
        f'blocks {EARLY_BLOCKS[0]}-{EARLY_BLOCKS[-1]} at {p.high} bits, every scored site of the '
        f'later blocks and reductions at {p.low}, the rest at {p.k}',
    )
    margin = p.budget.check(p.sites, bits).margin_bits
    for s in droppable:
        if margin >= 0:
            break
        bits[s.name] = (p.low, p.low)
        margin += s.params * (p.k - p.low)
    return bits


def _greedy(p: _Problem) -> dict[str, Bits]:
    """MPTQ-ViT style: start at k-1, raise the best score-per-weight site by one bit while it fits.

    The ratio of a site does not change as it is raised, and the free budget only shrinks, so one
    pass over the sites in decreasing ratio (ties by name) performs exactly that repeated choice.
    """
    adjustable = p.adjustable()
    bits = {**p.base(), **{s.name: (p.low, p.low) for s in adjustable}}
    p.require_feasible(bits, f'every scored weighted site at {p.low} bits')
    margin = p.budget.check(p.sites, bits).margin_bits
    ratio = {s.name: p.scores[s.name] / s.params if s.params else math.inf for s in adjustable}
    for s in sorted(adjustable, key=lambda s: (-ratio[s.name], s.name)):
        w = p.low
        while w < p.high and s.params <= margin:
            w, margin = w + 1, margin - s.params
        bits[s.name] = (w, w)
    return bits


def _choose_bits(
    p: _Problem, cost: Callable[[Site, int], float], time_limit: float | None = None, mip_rel_gap: float = 0.0
) -> dict[str, Bits]:
    """Minimize ``Σ cost(site, bits)`` under the weight budget, one binary per (site, allowed bits).

    The budget row is divided by the gcd of the weight counts so its coefficients stay small
    integers, and the rounded solution is re-checked exactly (solver tolerances are not trusted).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    adjustable = p.adjustable()
    levels = p.levels()
    bits = {**p.base(), **{s.name: (p.low, p.low) for s in adjustable}}
    p.require_feasible(bits, f'every scored weighted site at {p.low} bits')
    if not adjustable:
        return bits
    moving = {s.name for s in adjustable}
    free = p.budget.limit_bits(p.sites) - sum(
        s.params * bits[s.name][0] for s in p.sites if s.has_weights and s.name not in moving
    )
    g = math.gcd(*(s.params for s in adjustable)) or 1
    n, m = len(adjustable), len(levels)
    lv = np.asarray(levels, dtype=float)
    memory_row = np.outer([s.params // g for s in adjustable], lv).ravel()
    objective = np.asarray([cost(s, b) for s in adjustable for b in levels], dtype=float)
    one_choice = LinearConstraint(np.kron(np.eye(n), np.ones(m)), 1, 1)
    memory = LinearConstraint(memory_row[None, :], -np.inf, free // g)
    constraints = [one_choice, memory]
    if p.budget.max_bops is not None:
        # the same integer scaling for BOPs: macs·w·a per choice, the fixed sites' BOPs off the limit
        fixed_bops = account([s for s in p.sites if s.name not in moving], p.pin(bits)).bops
        gb = math.gcd(*(s.macs for s in adjustable)) or 1
        bops_row = np.asarray([s.macs // gb * b * p.act(s, b) for s in adjustable for b in levels], dtype=float)
        constraints.append(LinearConstraint(bops_row[None, :], -np.inf, (p.budget.max_bops - fixed_bops) // gb))
    options = {'mip_rel_gap': mip_rel_gap, **({'time_limit': time_limit} if time_limit is not None else {})}
    res = milp(objective, integrality=np.ones(n * m), bounds=Bounds(0, 1), constraints=constraints, options=options)
    if res.status != 0 or res.x is None:
        raise RuntimeError(
            f'{p.allocator} allocator: scipy.optimize.milp did not return an optimal solution '
            f'(status {res.status}: {res.message}). For a time limit, pass a larger '
            f'time_limit= or a looser mip_rel_gap=.'
        )
    choice = np.rint(res.x).reshape(n, m)
    if not np.all(choice.sum(axis=1) == 1):
        raise RuntimeError(f'{p.allocator} allocator: the solver returned a non-integral choice of bits')
    for s, row in zip(adjustable, choice):
        b = levels[int(np.argmax(row))]
        bits[s.name] = (b, b)
    check = p.budget.check(p.sites, p.pin(bits))
    if not check.holds:
        raise RuntimeError(
            f"{p.allocator} allocator: after rounding, the solver's solution exceeds the budget "
            f'({check.to_dict()}: solver tolerance); nothing was returned'
        )
    return bits


def _ilp(p: _Problem, time_limit: float | None = None, mip_rel_gap: float = 0.0) -> dict[str, Bits]:
    """Maximize Σ score_i·bits_i under the weight budget (see :func:`_choose_bits`)."""
    return _choose_bits(p, lambda s, b: -p.scores[s.name] * b, time_limit, mip_rel_gap)


def _sensitivity(p: _Problem, time_limit: float | None = None, mip_rel_gap: float = 0.0) -> dict[str, Bits]:
    """Minimize Σ sensitivity(site, bits) under the weight budget (LampQ / HAWQ-V3 style): the
    measured cost of every allowed bit-width, not a score times bits (see :func:`_choose_bits`)."""
    return _choose_bits(p, lambda s, b: p.sensitivity[s.name][b], time_limit, mip_rel_gap)


ALLOCATORS: dict[str, Callable[..., dict[str, Bits]]] = {
    'uniform': _uniform,
    'lrp_qvit': _lrp_qvit,
    'greedy': _greedy,
    'ilp': _ilp,
    'sensitivity': _sensitivity,
}


def allocate(
    name: str,
    sites: Sequence[Site],
    scores: Mapping[str, float] | None = None,
    *,
    target_bits: int,
    budget: Budget | None = None,
    fixed: Mapping[str, Bits] | None = None,
    sensitivity: Mapping[str, Mapping[int, float]] | None = None,
    act_bits: Mapping[str, int] | None = None,
    **options: Any,
) -> BitPlan:
    """Assign ``(w_bits, a_bits)`` to every site with allocator ``name`` (see module doc).

    ``scores``: site -> relative importance (higher = more important); ``sensitivity`` (the
    ``sensitivity`` allocator, instead of scores): site -> {bits: measured cost of the site at those
    bits}, for every allowed bit-width; its plan records the cost at ``target_bits`` as the score.
    ``act_bits``: site -> input bits the quantizer fixes regardless of the plan (module doc).
    ``options`` go to the allocator (``ilp``, ``sensitivity``: ``time_limit``, ``mip_rel_gap``).
    The plan records the scores, the budget with its check and accounting, the pinned sites and the
    allocator name.
    """
    if name not in ALLOCATORS:
        raise ValueError(f'unknown allocator {name!r}; available: {format_names(ALLOCATORS)}')
    if (name == 'sensitivity') != (sensitivity is not None) or (name == 'sensitivity' and scores):
        raise ValueError(
            "the 'sensitivity' allocator takes sensitivity= (site -> {bits: cost}) and no scores; "
            'the other allocators take scores and no sensitivity'
        )
    p = _problem(name, sites, scores or {}, target_bits, budget, fixed or {}, sensitivity, act_bits or {})
    bits = p.pin(ALLOCATORS[name](p, **options))
    check = p.budget.check(p.sites, bits)
    if not check.holds:  # every allocator is built to fit; never hand out a plan that does not
        raise RuntimeError(f'allocator {name!r} produced a plan over budget: {check.to_dict()}')
    record = {
        **p.budget.to_dict(),
        'target_bits': p.k,
        **check.to_dict(),
        'pinned': {n: list(b) for n, b in p.fixed.items()},
        'accounting': account(p.sites, bits).to_dict(),
    }
    return BitPlan(
        bits, scores={s.name: p.scores[s.name] for s in p.sites if s.name in p.scores}, allocator=name, budget=record
    )


def _check_sensitivity(
    table: Mapping[str, Mapping[int, float]], levels: list[int], sites: Sequence[Site]
) -> dict[str, dict[int, float]]:
    """``{site: {bits: cost}}`` with a finite cost for every allowed bit-width of every listed site."""
    out: dict[str, dict[int, float]] = {}
    for name, costs in table.items():
        if not isinstance(costs, Mapping):
            raise ValueError(f'sensitivity[{name!r}] must map bits to costs, got {costs!r}')
        costs = {int(b): v for b, v in costs.items()}
        missing = [b for b in levels if b not in costs]
        if missing:
            raise ValueError(f'sensitivity[{name!r}] has no cost for {missing} bits (the allowed bits are {levels})')
        checked = check_scores({f'{name}@{b}': costs[b] for b in levels})
        out[name] = {b: checked[f'{name}@{b}'] for b in levels}
    weightless = [s.name for s in sites if not s.has_weights and s.name in out]
    if weightless:
        raise ValueError(
            f'sensitivity names sites without weights, which a weight budget cannot trade: {format_names(weightless)}'
        )
    return out


def _problem(
    name: str,
    sites: Sequence[Site],
    scores: Mapping[str, float],
    k: int,
    budget: Budget | None,
    fixed: Mapping[str, Bits],
    sensitivity: Mapping[str, Mapping[int, float]] | None = None,
    act_bits: Mapping[str, int] | None = None,
) -> _Problem:
    sites = list(sites)
    names = [s.name for s in sites]
    known = set(names)
    if len(known) != len(names):
        dupes = [n for n, count in Counter(names).items() if count > 1]
        raise ValueError(f'site names must be unique; repeated: {format_names(dupes)}')
    if isinstance(k, bool) or not isinstance(k, int) or not MIN_BITS <= k <= MAX_BITS:
        raise ValueError(f'target_bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {k!r}')
    table = {}
    if sensitivity is not None:
        table = _check_sensitivity(sensitivity, sorted({_clip(k - 1), k, _clip(k + 1)}), sites)
        scores = {n: costs[k] for n, costs in table.items()}  # the record, and which sites can move
    for what, mapping in (('scores', scores), ('fixed', fixed), ('act_bits', act_bits or {})):
        unknown = [n for n in mapping if n not in known]
        if unknown:
            raise ValueError(
                f'{what} name {len(unknown)} site(s) not in the site list: {format_names(unknown)}. '
                f'Map names to the model being planned first (e.g. BitPlan.rename for timm -> mmdet).'
            )
    checked_scores = check_scores(scores)
    pinned = {n: check_bit_pair(f'fixed[{n!r}]', b) for n, b in fixed.items()}
    act_pins = {n: check_bit_pair(f'act_bits[{n!r}]', (MIN_BITS, a))[1] for n, a in (act_bits or {}).items()}
    budget = budget or Budget(weight_bits=k)
    if budget.max_bops is not None:
        if name not in ('ilp', 'sensitivity'):
            raise ValueError(
                f'allocator {name!r} budgets weight memory only; a budget with max_bops is solved by '
                f"the integer-program allocators 'ilp' and 'sensitivity'"
            )
        budget.require_macs(sites)
    if name != 'uniform' and not any(
        s.has_weights and s.name not in pinned and s.name in checked_scores for s in sites
    ):
        raise ValueError(
            f'allocator {name!r} ranks sites by score, but no unpinned site with weights has one '
            f'({len(checked_scores)} scores given)'
        )
    return _Problem(sites, checked_scores, k, budget, pinned, name, table, act_pins)
