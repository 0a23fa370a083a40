"""Budget accounting for bit plans: weight memory, average bits and BOPs, in exact integers.

Mixed-precision results are only comparable at equal cost (docs/method.md), so the cost is computed
one way, here, and recorded next to every plan and result. Sums are Python ints (no overflow, no
rounding); only the reported averages and megabytes are floats.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

from .bitplan import format_names
from .sites import Site

Assignment = Mapping[str, tuple[int, int]]


@dataclass(frozen=True)
class Accounting:
    """What an assignment of bits costs on a list of sites.

    ``avg_act_bits`` is the plain mean of ``a_bits`` over all sites (a matmul counts once, for its
    two operands); ``bops`` counts ``macs·w·a`` for Linear/Conv and ``macs·a·a`` for matmuls, whose
    two operands are both activations. Averages with nothing to average over are NaN.
    """

    n_sites: int
    params: int
    total_weight_bits: int
    weight_mb: float
    avg_weight_bits: float
    avg_act_bits: float
    avg_act_bits_mac_weighted: float
    macs: int
    bops: int

    def to_dict(self) -> dict:
        return asdict(self)


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan  # int / int is correctly rounded


def _lookup(sites: Sequence[Site], assignment: Assignment) -> list[tuple[Site, int, int]]:
    missing = [s.name for s in sites if s.name not in assignment]
    if missing:
        raise ValueError(f'no bits assigned to {len(missing)} site(s): {format_names(missing)}')
    return [(s, *assignment[s.name]) for s in sites]


def account(sites: Sequence[Site], assignment: Assignment) -> Accounting:
    """Cost of ``assignment`` (site -> (w_bits, a_bits)) over ``sites``; every site must be assigned."""
    rows = _lookup(sites, assignment)
    params = sum(s.params for s, _, _ in rows if s.has_weights)
    weight_bits = sum(s.params * w for s, w, _ in rows if s.has_weights)
    macs = sum(s.macs for s, _, _ in rows)
    return Accounting(
        n_sites=len(rows),
        params=params,
        total_weight_bits=weight_bits,
        weight_mb=weight_bits / 8 / 2**20,
        avg_weight_bits=_ratio(weight_bits, params),
        avg_act_bits=_ratio(sum(a for _, _, a in rows), len(rows)),
        avg_act_bits_mac_weighted=_ratio(sum(s.macs * a for s, _, a in rows), macs),
        macs=macs,
        bops=sum(s.macs * (w if s.has_weights else a) * a for s, w, a in rows),
    )


@dataclass(frozen=True)
class BudgetCheck:
    """Outcome of :meth:`Budget.check`: weight memory in bits, and BOPs where the budget limits them."""

    holds: bool
    used_bits: int
    limit_bits: int
    used_bops: int | None = None
    limit_bops: int | None = None

    @property
    def margin_bits(self) -> int:
        """How many bits of weight memory are still free (negative: by how much it is exceeded)."""
        return self.limit_bits - self.used_bits

    def __bool__(self) -> bool:
        return self.holds

    def to_dict(self) -> dict:
        out: dict[str, Any] = {
            'holds': self.holds,
            'used_bits': self.used_bits,
            'limit_bits': self.limit_bits,
            'margin_bits': self.margin_bits,
        }
        if self.limit_bops is not None:
            out.update(used_bops=self.used_bops, limit_bops=self.limit_bops)
        return out


@dataclass(frozen=True)
class Budget:
    """Weight memory ``Σ params_i·w_bits_i`` (sites with weights) at most ``weight_bits·Σ params_i``.

    That is: no more memory than every weighted site at ``weight_bits``. A float is read as the
    decimal it prints as (``4.1`` means 41/10, not its binary neighbour), so the limit is exact.

    ``max_bops`` (optional) also limits the BOPs ``Σ macs·w·a`` (matmuls ``macs·a·a``, as
    :func:`account` counts them) of the sites' measured MACs; :func:`uniform_bops` gives the BOPs of
    a uniform plan, so "no more BOPs than uniform k bits" is ``max_bops=uniform_bops(sites, k)``.
    """

    weight_bits: float
    max_bops: int | None = None

    def __post_init__(self):
        wb = self.weight_bits
        if isinstance(wb, bool) or not isinstance(wb, numbers.Real) or not math.isfinite(wb) or wb <= 0:
            raise ValueError(f'Budget.weight_bits must be a positive finite number, got {wb!r}')
        # plain int/float, so the budget is JSON-serializable as recorded in a plan
        object.__setattr__(self, 'weight_bits', int(wb) if isinstance(wb, numbers.Integral) else float(wb))
        mb = self.max_bops
        if mb is not None:
            if isinstance(mb, bool) or not isinstance(mb, numbers.Integral) or mb <= 0:
                raise ValueError(f'Budget.max_bops must be a positive integer (BOPs per image) or None, got {mb!r}')
            object.__setattr__(self, 'max_bops', int(mb))

    @property
    def exact_weight_bits(self) -> Fraction:
        wb = self.weight_bits
        return Fraction(repr(wb)) if isinstance(wb, float) else Fraction(wb)

    def limit_bits(self, sites: Sequence[Site]) -> int:
        """The largest integer weight memory allowed (weight memory is an integer, so floor is exact)."""
        return math.floor(self.exact_weight_bits * sum(s.params for s in sites if s.has_weights))

    def check(self, sites: Sequence[Site], assignment: Assignment) -> BudgetCheck:
        rows = _lookup(sites, assignment)
        used = sum(s.params * w for s, w, _ in rows if s.has_weights)
        limit = self.limit_bits(sites)
        if self.max_bops is None:
            return BudgetCheck(used <= limit, used, limit)
        self.require_macs(sites)
        bops = account(sites, assignment).bops
        return BudgetCheck(used <= limit and bops <= self.max_bops, used, limit, bops, self.max_bops)

    def require_macs(self, sites: Sequence[Site]) -> None:
        """With ``max_bops``: a ValueError unless some site has measured MACs (BOPs of 0 would pass any limit)."""
        if self.max_bops is not None and not any(s.macs for s in sites):
            raise ValueError(
                "Budget.max_bops needs the sites' MACs (Site.macs), and every site has 0: measure them "
                'on a forward first (e.g. mmdet_lrpq.engine.detector_sensitivity.measure_macs)'
            )

    def to_dict(self) -> dict:
        out = {
            'weight_bits': self.weight_bits,
            'constraint': 'sum(params * w_bits) <= weight_bits * sum(params), over sites with weights',
        }
        if self.max_bops is not None:
            out.update(
                max_bops=self.max_bops,
                bops_constraint='sum(macs * w_bits * a_bits) <= max_bops (matmuls: macs * a_bits^2), per image',
            )
        return out


def uniform_bops(sites: Sequence[Site], bits: int, act_bits: Mapping[str, int] | None = None) -> int:
    """BOPs of every site at ``(bits, bits)``, except the inputs ``act_bits`` pins (site -> a_bits)."""
    act_bits = act_bits or {}
    return account(sites, {s.name: (bits, act_bits.get(s.name, bits)) for s in sites}).bops
