"""LampQ's two planner options for the ``sensitivity`` allocator: type-aware normalisation, iterative ILP.

LampQ (Kim et al., AAAI 2026, arXiv 2511.10004) measures each layer's sensitivity with a Fisher
metric scaled per *component type*, ``Ω_i = α_t · tr(F_i)``, because the raw magnitudes of, e.g.,
attention projections and MLP layers are not comparable; it then assigns bits by integer linear
programming and *updates them iteratively* with feedback from the quantized model. Both are options
here, off by default (the ``sensitivity`` allocator alone is the existing one-pass planner):

* :func:`type_normalize` divides every site's cost curve ``S(s, ·)`` by its type's scale, so each
  type's mean cost at the target bits ``k`` is 1. What we could read of the paper does not give
  ``α_t``; **our choice**: ``α_t = 1 / mean_{s in t} S(s, k)`` (a type whose costs are all zero is
  left as it is). Within a type the ranking and every curve's shape are unchanged; across types
  only the scale moves. The types are :func:`component_type`'s.
* :func:`allocate_lampq` solves the ``sensitivity`` integer program, then ``iterations`` times
  re-measures the table *given the current assignment* (``measure(assignment)``, e.g. the Fisher
  proxy with every other site quantized at its assigned bits) and re-solves on it, stopping early
  at a fixed point. The result is the assignment, among every one visited (the one-pass plan
  first), with the lowest cost on the **last** measured table — so it is never worse than one ILP
  pass on the metric it ends with, whatever the solver's gap or time limit. The paper's exact
  update rule is not in what we could read; this re-measure/re-solve loop is our choice.

Pure Python/NumPy/SciPy like the rest of ``mmdet_lrpq.plan``: the re-measurement is a callable.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..bits import Bits
from .allocators import allocate
from .bitplan import BitPlan
from .budget import Budget
from .sites import SWIN_LAYER_TYPES, Site

Table = Mapping[str, Mapping[int, float]]
MAX_ITERATIONS = 10


def component_type(site: Site) -> str:
    """The component type a site is normalised with.

    Backbone sites: their Swin layer type (``patch_embed``, ``qkv``, ``proj``, ``fc1``, ``fc2``,
    ``reduction`` = patch merging). Elsewhere: the module path up to its last ``*head`` component,
    indices dropped (``roi_head.bbox_head``, ``roi_head.mask_head``, ``rpn_head``; Cascade's three
    ``roi_head.bbox_head.<i>`` are one type), else the top-level module (``neck``).
    """
    if site.layer_type in SWIN_LAYER_TYPES:
        return site.layer_type
    parts = [p for p in site.name.split('.') if not p.isdigit()]
    heads = [i for i, p in enumerate(parts[:-1]) if p.endswith('head')]
    return '.'.join(parts[: heads[-1] + 1]) if heads else parts[0]


def type_normalize(
    sensitivity: Table, sites: Sequence[Site], target_bits: int, type_of: Callable[[Site], str] | None = None
) -> tuple[dict[str, dict[int, float]], dict[str, float]]:
    """``(table, scale)``: every site's costs times its type's ``α_t = 1 / mean S(·, k)`` (module doc).

    ``sensitivity``: site -> {bits: cost}, each with a cost at ``target_bits``; ``type_of``: site ->
    type (default :func:`component_type`). ``scale`` maps each type to its ``α_t``.
    """
    type_of = component_type if type_of is None else type_of
    if not callable(type_of):
        raise ValueError(f'type_of must be a callable site -> component type, got {type_of!r}')
    by_name = {s.name: s for s in sites}
    unknown = [n for n in sensitivity if n not in by_name]
    if unknown:
        raise ValueError(
            f'type_normalize: sensitivity names {len(unknown)} site(s) not in the site list: '
            f'{", ".join(map(repr, unknown[:10]))}'
        )
    types: dict[str, str] = {}
    at_k: dict[str, list[float]] = {}
    for name, costs in sensitivity.items():
        costs = {int(b): v for b, v in costs.items()}
        if target_bits not in costs:
            raise ValueError(f'type_normalize: sensitivity[{name!r}] has no cost at the target {target_bits} bits')
        t = type_of(by_name[name])
        if not isinstance(t, str) or not t:
            raise ValueError(f'type_of({name!r}) must return a non-empty string, got {t!r}')
        types[name] = t
        at_k.setdefault(t, []).append(float(costs[target_bits]))
    means = {t: sum(v) / len(v) for t, v in at_k.items()}
    scale = {t: 1.0 / m if m > 0 else 1.0 for t, m in means.items()}
    table = {
        name: {int(b): float(v) * scale[types[name]] for b, v in costs.items()} for name, costs in sensitivity.items()
    }
    return table, scale


def plan_cost(table: Table, bits: Mapping[str, Bits]) -> float:
    """``Σ table[s][w_bits(s)]`` over the sites of ``table``: the integer program's objective."""
    return sum(float(costs[bits[name][0]]) for name, costs in table.items())


def _check_options(type_aware: Any, iterations: Any, measure: Any) -> None:
    if not isinstance(type_aware, bool):
        raise ValueError(f'type_aware must be True or False, got {type_aware!r}')
    if (
        isinstance(iterations, bool)
        or not isinstance(iterations, numbers.Integral)
        or not 0 <= int(iterations) <= MAX_ITERATIONS
    ):
        raise ValueError(
            f'iterations must be an integer in 0..{MAX_ITERATIONS} (each one re-measures the '
            f'sensitivity and re-solves), got {iterations!r}'
        )
    if iterations and not callable(measure):
        raise ValueError(
            f'iterations={iterations} needs measure= (a callable assignment -> sensitivity table '
            f'that re-measures given the current bits), got {measure!r}'
        )


def allocate_lampq(
    sites: Sequence[Site],
    sensitivity: Table,
    *,
    target_bits: int,
    budget: Budget | None = None,
    fixed: Mapping[str, Bits] | None = None,
    act_bits: Mapping[str, int] | None = None,
    type_aware: bool = False,
    type_of: Callable[[Site], str] | None = None,
    iterations: int = 0,
    measure: Callable[[dict[str, Bits]], Table] | None = None,
    **options: Any,
) -> BitPlan:
    """The ``sensitivity`` allocator with LampQ's options (module doc); a :class:`BitPlan`.

    ``sensitivity``: the first measured table (site -> {bits: cost}); ``measure(assignment)``: a
    re-measured table given ``assignment`` (every site -> ``(w_bits, a_bits)``, as the plan resolves
    them), needed when ``iterations > 0``. ``budget``, ``fixed``, ``act_bits`` and ``options``
    (``time_limit``, ``mip_rel_gap``) are :func:`~mmdet_lrpq.plan.allocate`'s, for every solve. With
    ``type_aware=False, iterations=0`` the plan is exactly ``allocate('sensitivity', ...)``'s. The
    plan's ``source['lampq']`` records the options, the type scales and every iteration.
    """
    _check_options(type_aware, iterations, measure)
    sites = list(sites)

    def metric(table: Table) -> tuple[Table, dict[str, float] | None]:
        return type_normalize(table, sites, target_bits, type_of) if type_aware else (table, None)

    def solve(table: Table) -> BitPlan:
        return allocate(
            'sensitivity',
            sites,
            sensitivity=table,
            target_bits=target_bits,
            budget=budget,
            fixed=fixed,
            act_bits=act_bits,
            **options,
        )

    table, scale = metric(sensitivity)
    plan = solve(table)
    if not type_aware and not iterations:
        return plan
    visited = [plan]
    history: list[dict] = [{'measured_at': 'float model', 'objective': plan_cost(table, plan.resolve(sites))}]
    assert measure is not None  # _check_options: iterations need it
    for i in range(1, iterations + 1):
        current = plan.resolve(sites)
        try:
            table, scale = metric(measure(dict(current)))
            new = solve(table)
        except ValueError as err:
            raise ValueError(f'iteration {i}: the re-measured sensitivity cannot be allocated: {err}') from None
        proposed = new.resolve(sites)
        changed = sorted(n for n in current if current[n] != proposed[n])
        history.append(
            {
                'measured_at': f'plan of iteration {i - 1}',
                'objective_before': plan_cost(table, current),
                'objective': plan_cost(table, proposed),
                'changed_sites': len(changed),
            }
        )
        visited.append(new)
        plan = new
        if not changed:  # a fixed point: measuring again would give the same table
            break
    # the best on the last table; ties go to the latest (the solver's own optimum on that table)
    costs = [plan_cost(table, p.resolve(sites)) for p in visited]
    best = min(range(len(visited)), key=lambda j: (costs[j], -j))
    chosen = visited[best]
    chosen.source = {
        **chosen.source,
        'lampq': {
            'type_aware': type_aware,
            'iterations': iterations,
            'type_scales': None if scale is None else dict(sorted(scale.items())),
            'type_rule': (
                'alpha_t = 1 / mean over the type of the cost at k bits; types: Swin layer type, '
                'else the module path up to its last *head component, else the top-level module'
            )
            if type_aware
            else None,
            'history': history,
            'chosen_iteration': best,
            'objective_on_last_table': {'chosen': costs[best], 'one_pass': costs[0]},
        },
    }
    if chosen is not plan:
        chosen.scores = {n: c[target_bits] for n, c in table.items()}
    return chosen


__all__ = ['component_type', 'type_normalize', 'plan_cost', 'allocate_lampq', 'MAX_ITERATIONS']
