"""Calibration input as rows, checked, and ``torch.quantile``'s values taken from the rows' tails.

Every calibration in :mod:`.functional` views its input as rows (``[C, M]`` per channel, ``[1, numel]``
per tensor), rejects empty and non-finite input, and starts from extreme quantiles of each row.
:func:`quantiles` gives ``torch.quantile``'s values bit for bit while extracting only the order
statistics their ranks touch (``topk`` of the tails, an exact threshold-and-select for large flat
tensors, the fused per-row selection of :mod:`._ext` on CPU) instead of sorting whole rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from torch import Tensor

from . import _ext

# Flat tensors above this size take the threshold-and-select path for their tails.
_SELECT_MIN_ELEMENTS = 1 << 20
# Rows of per-channel inputs at least this long take the fused per-row selection (when built).
_ROW_SELECT_MIN = 1 << 13


# ----------------------------------------------------------------------------- validation
def _check_nonempty(x: Tensor, what: str) -> None:
    if x.numel() == 0:
        raise ValueError(f'cannot calibrate {what} on an empty tensor')


def _row_extremes(rows: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Per-row (min, max) in one pass; NaN/Inf anywhere is an error (aminmax propagates NaN).

    One row (per tensor) is reduced whole: ``aminmax(dim=1)`` runs a single row on one thread."""
    if rows.shape[0] == 1:
        lo, hi = (v.reshape(1) for v in torch.aminmax(rows))
    else:
        lo, hi = torch.aminmax(rows, dim=1)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        n_nan, n_inf = int(torch.isnan(rows).sum()), int(torch.isinf(rows).sum())
        raise ValueError(
            f'cannot calibrate {what}: input has {n_nan} NaN and {n_inf} Inf values '
            f'(shape {tuple(rows.shape)} as rows); check the model/input for overflow'
        )
    return lo, hi


def _rows(x: Tensor, channel_axis: int | None) -> Tensor:
    """View ``x`` as ``[C, M]`` (channels first) or ``[1, numel]`` for per-tensor."""
    x = x.detach().float()
    if channel_axis is None:
        return x.reshape(1, -1)
    axis = channel_axis % x.dim()
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _unrows(v: Tensor, like: Tensor, channel_axis: int | None) -> Tensor:
    """Shape per-row results ``[C]`` so they broadcast against ``like``."""
    if channel_axis is None:
        return v.reshape(())
    shape = [1] * like.dim()
    shape[channel_axis % like.dim()] = -1
    return v.reshape(shape)


# ----------------------------------------------------------------------------- quantiles
def _rank(n: int, q: float) -> tuple[int, int, float]:
    """torch.quantile's rank arithmetic: q is rounded to float32, the rank taken in double."""
    r = float(np.float32(q)) * (n - 1)
    return math.floor(r), math.ceil(r), r - math.floor(r)


# Every this many-th value forms the sample that sets a tail threshold. A prime, so that the
# sample visits every channel of tensors whose sizes are products of small primes (Swin's 32-wide
# attention heads, 96·2^k channels, 7x7 windows): a stride of 32 would sample the q/k/v operands of
# Swin attention (32 per head) in one channel of 32 and [.., 192] activations in 6 channels of 192,
# the threshold would often miss, and the exact fallback (a full single-threaded topk) costs more
# than the select path of a tensor ten times larger. (csrc/fused_quant.cpp row_tails samples every
# 32nd value of one channel's row.)
_SAMPLE_STRIDE = 31


def _tail_sample(flat: Tensor) -> Tensor:
    """Every ``_SAMPLE_STRIDE``-th value of ``flat``, gathered once: both tails' thresholds come from
    it, and a contiguous copy is cheaper to select in than the strided view."""
    return flat[::_SAMPLE_STRIDE].contiguous()


def _sample_threshold(sample: Tensor, k: int, largest: bool) -> Tensor:
    """A value that at least ``k`` elements of the sampled tensor likely reach: the
    (2k/stride + 64)-th most extreme value of its :func:`_tail_sample`. Callers verify the count,
    so a bad guess costs time, never exactness."""
    ks = min(sample.numel(), 2 * (k // _SAMPLE_STRIDE) + 64)
    return sample.topk(ks, largest=largest).values[-1]


def _tail_from_beyond(beyond: Tensor, thr: Tensor, k: int, largest: bool) -> Tensor:
    """The ``k`` most extreme values given every value strictly beyond ``thr`` and at least
    ``k - beyond.numel()`` values equal to it: those beyond, in order, then copies of ``thr``."""
    if beyond.numel() >= k:
        return beyond.topk(k, largest=largest).values
    head = beyond.sort(descending=largest).values
    return torch.cat([head, thr.expand(k - head.numel())])


def _top_tail(rows: Tensor, k: int, largest: bool) -> Tensor:
    """The ``k`` largest (descending) or smallest (ascending) values of every row, exactly."""
    n = rows.shape[1]
    if rows.shape[0] == 1 and n >= _SELECT_MIN_ELEMENTS and k < n // 64:
        flat = rows[0]
        # Estimate a threshold from a strided sample with generous slack, then verify: if at
        # least k elements are on the tail side of it, the k most extreme are among them (exact,
        # no assumption about the data). NaN/Inf input cannot make this wrong, only fall through
        # to the plain topk (callers reject it afterwards).
        thr = _sample_threshold(_tail_sample(flat), k, largest)
        mask = flat >= thr if largest else flat <= thr
        n_sel = int(torch.count_nonzero(mask))  # (not bool .sum(), which promotes to int64 first)
        if n_sel >= k:
            if n_sel <= 8 * k + 4096:
                return flat[mask].topk(k, largest=largest).values.unsqueeze(0)
            # Many values tie at the threshold (e.g. the zeros after a ReLU).
            beyond = flat[flat > thr] if largest else flat[flat < thr]
            return _tail_from_beyond(beyond, thr, k, largest).unsqueeze(0)
    return rows.topk(k, dim=1, largest=largest, sorted=True).values


def _select_tails(flat: Tensor, k_top: int, k_bot: int, fused: _ext.FusedKernels) -> tuple[Tensor, Tensor] | None:
    """Both tails of a large flat tensor in one fused pass: the ``k_top`` largest (descending) and
    ``k_bot`` smallest (ascending) values, exactly, or ``None`` if a sampled threshold was too tight.

    Same thresholds as :func:`_top_tail`'s select path; values strictly beyond a threshold are
    collected and values equal to it counted, so ties at the threshold (post-ReLU zeros) cost nothing.
    """
    sample = _tail_sample(flat)
    hi = _sample_threshold(sample, k_top, True) if k_top else flat.new_tensor(math.inf)
    lo = _sample_threshold(sample, k_bot, False) if k_bot else flat.new_tensor(-math.inf)
    above, n_hi, below, n_lo = fused.tails_beyond(flat, float(hi), float(lo))

    def finish(beyond: Tensor, n_eq: int, t: Tensor, k: int, largest: bool) -> Tensor | None:
        return None if beyond.numel() + n_eq < k else _tail_from_beyond(beyond, t, k, largest)

    top = finish(above, n_hi, hi, k_top, True) if k_top else above[:0]
    bot = finish(below, n_lo, lo, k_bot, False) if k_bot else below[:0]
    return None if top is None or bot is None else (top.unsqueeze(0), bot.unsqueeze(0))


def quantiles(rows: Tensor, qs: Sequence[float]) -> Tensor:
    """``torch.quantile(row, q)`` for every row of ``rows`` [C, M] and every q -> ``[len(qs), C]``.

    Bit-identical to ``torch.quantile`` (linear interpolation) but only extracts the order
    statistics that extreme quantiles need, so it costs a ``topk`` instead of a full sort.
    """
    n = rows.shape[1]
    ranks = [_rank(n, q) for q in qs]
    needed = [i for lo, hi, _ in ranks for i in (lo, hi)]
    k_top = max((n - i for i in needed if i >= n // 2), default=0)
    k_bot = max((i + 1 for i in needed if i < n // 2), default=0)
    if k_top + k_bot >= n // 4:  # the tails are a sizeable part of the row: sorting is as cheap
        ordered = rows.sort(dim=1).values
        pick = lambda i: ordered[:, i]  # noqa: E731
    else:
        fused = _ext.kernels() if rows.device.type == 'cpu' and rows.dtype == torch.float32 else None
        thin = fused is not None and max(k_top, k_bot) < n // 64  # tails small enough to select
        tails: tuple[Tensor | None, Tensor | None] | None = None
        if thin and rows.shape[0] == 1 and n >= _SELECT_MIN_ELEMENTS:
            assert fused is not None  # (thin implies it)
            tails = _select_tails(rows[0].contiguous(), k_top, k_bot, fused)
        elif thin and rows.shape[0] > 1 and n >= _ROW_SELECT_MIN:
            assert fused is not None  # (thin implies it)
            top, bot, ok = fused.row_tails(rows.contiguous(), k_top, k_bot)
            if not bool(ok.all()):  # a sampled threshold was too tight for some rows: topk those
                bad = (~ok).nonzero()[:, 0]
                top[bad] = _top_tail(rows[bad], k_top, largest=True) if k_top else top[bad]
                bot[bad] = _top_tail(rows[bad], k_bot, largest=False) if k_bot else bot[bad]
            tails = (top, bot)
        if tails is None:
            tails = (
                _top_tail(rows, k_top, largest=True) if k_top else None,
                _top_tail(rows, k_bot, largest=False) if k_bot else None,
            )
        # top[:, j] = x_(n-1-j), bot[:, j] = x_(j); a tail is None only when its k is 0 and pick never reads it
        top, bot = cast(tuple[Tensor, Tensor], tails)
        pick = lambda i: top[:, n - 1 - i] if i >= n // 2 else bot[:, i]  # noqa: E731
    # The weight in the rows' dtype, as torch.quantile rounds it (float32 for float32 rows).
    return torch.stack([torch.lerp(pick(lo), pick(hi), rows.new_tensor(w)) for lo, hi, w in ranks])
