"""The quantizers' maths with RepQ-ViT's exact semantics, vectorized over channels.

The uniform quantizer (and its region-wise form, OPT-m) and the log-√2 quantizer: their calibration
and their fake-quant, differentiable where reconstruction learns through them. Calibration starts
from the exact quantiles of :mod:`.quantiles`; the integer codes and the log2-with-shift form that
integer pipelines use are in :mod:`.integer_form`.

Contract (docs/method.md). Every function here gives the same numbers as RepQ-ViT's
``UniformQuantizer`` / ``LogSqrt2Quantizer`` run in this environment (their per-channel Python
loop over ``torch.quantile``), without a loop over channels:

* quantiles follow ``torch.quantile(x, q)`` bit for bit: ``rank = double(float32(q)) * (n - 1)``,
  ``w = float32(rank - floor(rank))``, ``lerp(x_(floor), x_(ceil), w)`` in float32. Only the
  order statistics those ranks touch are extracted (top/bottom tails via ``topk``; for large
  flat tensors via an exact threshold-and-select), instead of sorting the whole tensor;
* the MSE search over ``PERCENTILES`` keeps the candidate with the strictly lowest score (ties
  keep the earlier percentile), evaluated in cache-sized chunks;
* ``fake_quant_uniform`` is ``(clamp(round(x/Δ) + zp, 0, 2^b-1) - zp) * Δ`` computed as
  ``clamp(round(x/Δ), -zp, 2^b-1-zp) * Δ``, which is the same float for integer ``zp``.

On CPU the element-wise work runs in fused C++ kernels (``csrc/fused_quant.cpp``, built once by
:mod:`._ext`): the three MSE candidates in one pass, fake-quant in one pass, both quantile tails in
one pass, and the log-√2 steps after PyTorch's own ``log2`` in one pass. They perform the same float
operations as the PyTorch code below, which stays the reference and the fallback (CUDA, no compiler,
``MMDET_LRPQ_NO_EXT=1``); the tests run the parity checks through both.

Where RepQ-ViT divides by zero (constant tensors or channels) we define the result instead; see
:func:`uniform_qparams`. NaN/Inf input and bit-widths outside 2..8 raise ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..bits import check_bits
from . import _ext
from .quantiles import _check_nonempty, _row_extremes, _rows, _unrows, quantiles

PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999)
SQRT2 = math.sqrt(2.0)
# Elements per step of the candidate-MSE loop: bounds the temporaries' memory, yet large enough that
# each op call amortizes its thread start-up (figures: docs/benchmarks.md, "Chunk sizes").
_CHUNK_ELEMENTS = 1 << 20
# Elements per step of the log-sqrt2 fake-quant: thread start-up per op call stays negligible, and
# the passes mostly hit cache (same section).
_LOG_CHUNK = 1 << 20


# ----------------------------------------------------------------------------- uniform quantizer
def _uniform_candidate(lo: Tensor, hi: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    delta = (hi - lo) / levels
    return delta, (-lo / delta).round()


def _sum_sq_err(rows: Tensor, error: Callable[..., Tensor]) -> Tensor:
    """Per-row sum of squared fake-quantization error, ``error(chunk)`` streamed over column chunks."""
    c, m = rows.shape
    cols = max(1, _CHUNK_ELEMENTS // c)
    total = rows.new_zeros(c, dtype=torch.float64)
    for start in range(0, m, cols):
        err = error(rows[:, start : start + cols])
        total += torch.linalg.vecdot(err, err, dim=1).double()
    return total


def _uniform_error(x: Tensor, delta: Tensor, zero_point: Tensor, levels: int) -> Tensor:
    """``x - fake_quant_uniform(x)`` in four passes (the last one fused: ``x - y·Δ``)."""
    y = torch.div(x, delta)
    y.round_().clamp_(-zero_point, levels - zero_point)
    return torch.addcmul(x, y, delta, value=-1, out=y)


def _fq_uniform_(y: Tensor, delta: Tensor, zero_point: Tensor, levels: int) -> Tensor:
    """In-place tail of the uniform fake-quant on ``y = x / delta``."""
    y.round_()
    # Python-number bounds are the cheaper clamp on CPU; elsewhere reading them would wait for the
    # device, and clamping by tensors gives the same floats (integer zero point).
    if zero_point.dim() == 0 and zero_point.device.type == 'cpu':
        y.clamp_(-float(zero_point), levels - float(zero_point))
    else:
        y.clamp_(-zero_point, levels - zero_point)
    return y.mul_(delta)


def _select_best(scores: Tensor) -> Tensor:
    """Index of the strictly lowest score per column (ties keep the earlier candidate; NaN never wins)."""
    return torch.nan_to_num(scores, nan=math.inf).argmin(dim=0)


def uniform_qparams(
    x: Tensor, bits: int, channel_axis: int | None = None, percentiles: Sequence[float] = PERCENTILES
) -> tuple[Tensor, Tensor]:
    """RepQ-ViT's percentile/MSE calibration of an asymmetric uniform quantizer.

    For each pct, ``max = quantile(x, pct)``, ``min = quantile(x, 1 - pct)``,
    ``Δ = (max - min) / (2^b - 1)``, ``zp = round(-min / Δ)``; the candidate with the strictly
    lowest MSE wins. Per tensor (``channel_axis=None``) or per channel along ``channel_axis``
    (conv/linear weight: 0, ``[B, N, C]`` activation: -1). Returns ``(delta, zero_point)``
    broadcastable to ``x`` (0-d tensors per tensor).

    Degenerate input, where RepQ-ViT divides by zero: a candidate with ``Δ = 0`` never wins;
    a row whose every candidate has ``Δ = 0`` is (almost) constant with value ``v`` and gets, when
    other channels of the same tensor are regular, their mean ``Δ`` (so the channel stays
    neutral under scale reparameterization) and ``zp = clamp(round(-v/Δ), 0, 2^b-1)``; otherwise
    ``Δ = |v| / (2^b - 1)`` (``1`` for ``v = 0``) with ``zp = 0`` (``2^b - 1`` for ``v < 0``), which
    represents ``v`` exactly.
    """
    levels = (1 << check_bits(bits)) - 1
    _check_nonempty(x, 'a uniform quantizer')
    rows = _rows(x, channel_axis)
    qs = [q for p in percentiles for q in (p, 1.0 - p)]
    qv = quantiles(rows, qs).view(len(percentiles), 2, -1)  # [P, {max,min}, C]
    deltas, zps = _uniform_candidate(qv[:, 1], qv[:, 0], levels)  # [P, C]
    regular = deltas > 0
    safe_d = torch.where(regular, deltas, torch.ones_like(deltas))
    safe_z = torch.where(regular, zps, torch.zeros_like(zps))
    fused = _ext.kernels() if rows.device.type == 'cpu' else None
    if fused is not None:  # all candidates in one pass over the rows (same float ops per element)
        scores = fused.uniform_sq_err(rows, safe_d, safe_z, levels)
    else:
        scores = torch.stack(
            [
                _sum_sq_err(rows, lambda t, d=d[:, None], z=z[:, None]: _uniform_error(t, d, z, levels))
                for d, z in zip(safe_d, safe_z)
            ]
        )
    # NaN/Inf input makes every candidate's error non-finite (each error pass reads every element),
    # so the full min/max check runs only then and raises with counts; finite input whose squared
    # error overflows passes it and proceeds (an infinite score simply never wins).
    if not bool(torch.isfinite(scores).all()):
        _row_extremes(rows, 'a uniform quantizer')
    scores[~regular] = math.inf
    best = _select_best(scores)
    cols = torch.arange(rows.shape[0], device=rows.device)
    delta, zp = deltas[best, cols], zps[best, cols]

    const = ~regular.any(dim=0)
    if const.any():
        v = qv[-1, 0, const]  # the (near-)constant value
        if (~const).any():
            d = delta[~const].mean().expand_as(v)
            z = (-v / d).round().clamp(0, levels)
        else:
            d = torch.where(v != 0, v.abs() / levels, torch.ones_like(v))
            z = torch.where(v < 0, torch.full_like(v, levels), torch.zeros_like(v))
        delta, zp = delta.clone(), zp.clone()
        delta[const], zp[const] = d, z
    return _unrows(delta, x, channel_axis), _unrows(zp, x, channel_axis)


def fake_quant_uniform(
    x: Tensor, delta: Tensor, zero_point: Tensor, bits: int, scratch: Tensor | None = None
) -> Tensor:
    """``(clamp(round(x/Δ) + zp, 0, 2^b-1) - zp) * Δ`` (round half to even), in ``x``'s dtype.

    One fused pass on CPU (per tensor or per channel, no autograd), else four passes in PyTorch;
    both compute the same floats. ``scratch``: a reused float32 buffer the fused pass may write the
    result into (for contiguous ``x``; the caller must be done with the result before reusing it).
    Lower-precision input (float16/bfloat16) is quantized in the qparams' precision (float32, as
    calibrated) and rounded back to ``x``'s dtype, so that it can meet the layer's own parameters.
    """
    levels = (1 << check_bits(bits)) - 1
    inner = _ext.fused_layout(x, delta) if zero_point.shape == delta.shape else None
    fused = _ext.kernels() if inner else None
    if fused is not None:
        assert inner  # (fused is looked up only then)
        if delta.numel() > 1 or _ext.is_dense(x):
            return fused.fake_quant_uniform(x, delta, zero_point, levels, inner, scratch)
        rows = _ext.strided_rows(x)  # else the PyTorch path below, which lays the output out as it does
        if rows is not None:
            view, order = rows
            out = fused.fake_quant_uniform_rows(view, delta, zero_point, levels, scratch)
            return out.view([x.shape[d] for d in order]).permute(*np.argsort(order).tolist())
    work = torch.promote_types(x.dtype, delta.dtype)
    if _records_grad(x, delta):
        return _UniformSTE.apply(x, delta, zero_point, bits)
    return _fq_uniform_(x.to(work) / delta, delta, zero_point, levels).to(x.dtype)


def _records_grad(x: Tensor, delta: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or delta.requires_grad)


def _sum_to(t: Tensor, like: Tensor) -> Tensor:
    """``t`` summed over the dimensions ``like`` was broadcast along, in ``like``'s dtype."""
    return (t.sum_to_size(like.shape) if like.dim() else t.sum()).to(like.dtype)


class _UniformSTE(torch.autograd.Function):
    """The uniform fake-quant, differentiable: rounding passes the gradient straight through (STE)
    inside the clipping range and ``Δ`` gets LSQ's gradient, ``Σ g·(q - x/Δ)`` inside the range and
    ``Σ g·q`` where clipped (``q`` the clamped integer). The forward is the no-grad computation
    (fused on CPU), so the values are the same floats; the backward is a few element-wise passes
    instead of autograd's chain through round/clamp/mul."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, delta: Tensor, zero_point: Tensor, bits: int) -> Tensor:
        ctx.save_for_backward(x, delta, zero_point)
        ctx.bits = bits
        return fake_quant_uniform(x, delta, zero_point, bits)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, delta, zero_point = ctx.saved_tensors
        levels = (1 << ctx.bits) - 1
        y = x.to(torch.promote_types(x.dtype, delta.dtype)) / delta
        q = y.round().clamp_(-zero_point, levels - zero_point)
        inside = q == y.round()
        # masks multiply rather than select: torch.where is several times slower on CPU here
        grad_x = (g * inside).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_delta = _sum_to(g * (q - y * inside), delta) if ctx.needs_input_grad[1] else None
        return grad_x, grad_delta, None, None


def fake_quant_uniform_rounded(x: Tensor, delta: Tensor, zero_point: Tensor, bits: int, rounding: Tensor) -> Tensor:
    """``Δ·clamp(floor(x/Δ) + rounding, -zp, 2^b-1-zp)``: a uniform fake-quant with a learned rounding.

    ``rounding`` in [0, 1], shaped like ``x`` (AdaRound): during reconstruction a soft, differentiable
    value; afterwards 0 or 1 per element (round down or up). In the qparams' precision, like
    :func:`fake_quant_uniform`.
    """
    levels = (1 << check_bits(bits)) - 1
    work = torch.promote_types(x.dtype, delta.dtype)
    y = torch.floor(x.to(work) / delta) + rounding.to(work)
    return (torch.clamp(y, -zero_point, levels - zero_point) * delta).to(x.dtype)


# ----------------------------------------------------------------------------- region-wise uniform (OPT-m)
# Exponents m searched for the ratio 2^m between the two regions' steps. GELU's negative part lies in
# [-0.17, 0] while its positive part reaches several units; m = 0 is the uniform quantizer itself.
OPT_M_EXPONENTS: tuple[int, ...] = tuple(range(9))


def fake_quant_regions(x: Tensor, delta: Tensor, zero_point: Tensor, ratio_exp: Tensor, bits: int) -> Tensor:
    """Region-wise uniform fake-quant (OPT-m): one ``b``-bit code range split at the zero point
    ``zp``; codes above it step by ``Δ`` (``x ≥ 0``), the ``zp`` codes below it by ``Δ⁻ = Δ·2^-m``::

        x ≥ 0: clamp(round(x/Δ), 0, 2^b-1-zp)·Δ,      x < 0: clamp(round(x/Δ⁻), -zp, 0)·Δ⁻

    ``m = 0`` is :func:`fake_quant_uniform`. In the qparams' precision, the result in ``x``'s dtype.
    The steps differ by a power of two, so an integer pipeline rescales one region by a shift.
    """
    levels = (1 << check_bits(bits)) - 1
    work = torch.promote_types(x.dtype, delta.dtype)
    xw = x.to(work)
    neg_delta = delta * torch.exp2(-ratio_exp.to(delta.dtype))
    pos = torch.round(xw / delta).clamp_(torch.zeros_like(zero_point), levels - zero_point).mul_(delta)
    neg = torch.round(xw / neg_delta).clamp_(-zero_point, torch.zeros_like(zero_point)).mul_(neg_delta)
    return torch.where(xw >= 0, pos, neg).to(x.dtype)


def _stretched_candidate(lo: Tensor, hi: Tensor, m: int, levels: int) -> tuple[Tensor, Tensor]:
    """RepQ's uniform candidate on the input with its negative part stretched by ``2^m``."""
    return _uniform_candidate(torch.where(lo < 0, lo * 2.0**m, lo), hi, levels)


def region_qparams(
    x: Tensor, bits: int, percentiles: Sequence[float] = PERCENTILES, exponents: Sequence[int] = OPT_M_EXPONENTS
) -> tuple[Tensor, Tensor, Tensor]:
    """OPT-m: ``(Δ, zp, m)`` of :func:`fake_quant_regions` with the lowest squared error on ``x``
    (0-d float32 each).

    For each of RepQ-ViT's percentile ranges ``[lo, hi]`` and each ``m`` in ``exponents``: RepQ's
    candidate on the stretched range ``[lo·2^m, hi]`` (``Δ = (hi - lo·2^m)/(2^b-1)``,
    ``zp = round(-lo·2^m/Δ)``), i.e. the negative region gets ``2^m`` times finer steps for the
    same codes. The strictly lowest error wins (ties: the earlier percentile, then the smaller ``m``).
    ``m = 0`` is RepQ's own candidate, so the search never does worse than the uniform quantizer on
    ``x``; ``m > 0`` is tried only for ranges with both signs. Input where every candidate is
    degenerate (``Δ = 0``) gets :func:`uniform_qparams` with ``m = 0``.
    """
    levels = (1 << check_bits(bits)) - 1
    _check_nonempty(x, 'a region-wise quantizer')
    rows = _rows(x, None)
    _row_extremes(rows, 'a region-wise quantizer')
    qs = [q for p in percentiles for q in (p, 1.0 - p)]
    qv = quantiles(rows, qs).view(len(percentiles), 2)  # [P, {max, min}]
    cands, regular = [], []
    for hi, lo in qv:
        straddles = bool(lo < 0) and bool(hi > 0)  # else there is one region only: m = 0
        for m in exponents:
            d, z = _stretched_candidate(lo, hi, m, levels)
            cands.append((d, z, m))
            regular.append(bool(d > 0) and (m == 0 or straddles))
    if not any(regular):
        delta, zp = uniform_qparams(x, bits, None, percentiles)
        return delta, zp, torch.zeros_like(delta)
    flat = rows[0]
    scores = torch.stack(
        [
            _sum_sq_err(
                flat.view(1, -1), lambda t, d=d, z=z, m=m: t - fake_quant_regions(t, d, z, d.new_tensor(float(m)), bits)
            )[0]
            if ok
            else torch.full((), math.inf, dtype=torch.float64, device=rows.device)
            for (d, z, m), ok in zip(cands, regular)
        ]
    )
    best = int(_select_best(scores[:, None])[0])
    d, z, m = cands[best]
    return d.reshape(()), z.reshape(()), d.new_tensor(float(m))


# ----------------------------------------------------------------------------- log-sqrt2 quantizer
def _log_sqrt2_codes_(t: Tensor, levels: int) -> Tensor:
    """In place on ``t = x/Δ``: ``clamp(round(-2·log2(t)), 0, 2^b)``; ``x = 0`` gives ``+inf -> 2^b``."""
    return t.log2_().mul_(-2.0).round_().clamp_(0, levels)


def log_sqrt2_table(delta: Tensor, bits: int) -> Tensor:
    """Dequantized value of every code, computed exactly as RepQ-ViT does (last entry: zero)."""
    levels = 1 << check_bits(bits)
    q = torch.arange(levels, dtype=torch.float32, device=delta.device)
    odd = (q % 2) * (SQRT2 - 1) + 1
    values = 2 ** (-1 * torch.ceil(q / 2)) * odd * delta.float().reshape(())
    return torch.cat([values, values.new_zeros(1)])


def fake_quant_log_sqrt2(x: Tensor, delta: Tensor, bits: int, scratch: Tensor | None = None) -> Tensor:
    """RepQ-ViT's log-√2 quantizer: ``x̂ = 2^(-ceil(q/2)) · (1 + (q mod 2)(√2-1)) · Δ``, 0 if q ≥ 2^b.

    Codes are looked up in a per-code table (same floats as RepQ-ViT's formula); the passes run
    over cache-sized chunks of large attention maps. On CPU one vectorized fused pass reads each
    code off the exponent and mantissa of ``x/Δ`` — the same code as PyTorch's ``log2`` everywhere
    but within 256 mantissa steps of a code boundary, where (and for special values) PyTorch's own
    ``log2`` decides, as here (``scratch``: as in :func:`fake_quant_uniform`). A NaN or negative
    input gives NaN. The result has ``x``'s dtype; lower-precision input is coded in ``Δ``'s precision
    (as :func:`fake_quant_uniform`).
    """
    levels = 1 << check_bits(bits)
    if _records_grad(x, delta):
        return _LogSqrt2STE.apply(x, delta, bits)
    table = log_sqrt2_table(delta, bits).to(x.dtype)
    fused = _ext.kernels() if _ext.fused_layout(x, delta) and delta.numel() == 1 else None
    if fused is not None:
        return fused.log_sqrt2_fake_quant(x.contiguous(), delta, table, scratch)
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    table = torch.cat([table, table.new_full((1,), math.nan)])  # NaN code (x < 0 or NaN) -> NaN
    work = torch.promote_types(x.dtype, delta.dtype)
    for src, dst in zip(flat.split(_LOG_CHUNK), out.split(_LOG_CHUNK)):
        codes = _log_sqrt2_codes_(torch.div(src.to(work), delta), levels).nan_to_num_(nan=levels + 1)
        torch.index_select(table, 0, codes.to(torch.int32), out=dst)
    return out.view(x.shape)


class _LogSqrt2STE(torch.autograd.Function):
    """The log-√2 fake-quant, differentiable, with the no-grad computation's floats: the output
    scales with ``Δ`` (gradient ``Σ g·x̂/Δ``) and ``x`` passes its gradient straight through where it
    is neither saturated (``x > Δ``) nor coded as zero. Element-wise passes and sums only (no
    scatter), so the gradient is deterministic on every device."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, delta: Tensor, bits: int) -> Tensor:
        out = fake_quant_log_sqrt2(x, delta, bits)
        ctx.save_for_backward(x, delta, out)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, delta, out = ctx.saved_tensors
        grad_x = g * ((x <= delta) & (out != 0)) if ctx.needs_input_grad[0] else None
        grad_delta = _sum_to(g * out / delta, delta) if ctx.needs_input_grad[1] else None
        return grad_x, grad_delta, None


def _log_sqrt2_sq_err(flat: Tensor, delta: Tensor, bits: int) -> Tensor:
    """Sum of squared log-√2 fake-quant error over a contiguous 1-D float tensor, as ``[1]`` float64."""
    fused = _ext.kernels() if flat.device.type == 'cpu' else None
    if fused is None:
        return _sum_sq_err(flat.view(1, -1), lambda t: fake_quant_log_sqrt2(t, delta, bits).sub_(t))
    return torch.tensor(
        [fused.log_sqrt2_sq_err(flat, delta, log_sqrt2_table(delta, bits))], dtype=torch.float64, device=flat.device
    )


def log_sqrt2_qparams(x: Tensor, bits: int, percentiles: Sequence[float] = PERCENTILES) -> Tensor:
    """RepQ-ViT's calibration of the log-√2 quantizer: ``Δ = quantile(x, pct)`` with the lowest MSE.

    Input must be non-negative (post-softmax probabilities). If every candidate is zero the
    tensor is (almost) all zeros and ``Δ = max(x)`` (``1`` when that is zero too) is returned.
    """
    check_bits(bits)
    _check_nonempty(x, 'a log-sqrt2 quantizer')
    rows = _rows(x, None)
    lo, hi = _row_extremes(rows, 'a log-sqrt2 quantizer')
    if lo[0] < 0:
        raise ValueError(
            f'the log-sqrt2 quantizer expects non-negative input (post-softmax attention); got min {float(lo[0]):.4g}'
        )
    cands = quantiles(rows, percentiles)[:, 0]  # [P]
    regular = cands > 0
    scores = torch.stack(
        [
            _log_sqrt2_sq_err(rows[0], d, bits)
            if ok
            else torch.full((1,), math.inf, dtype=torch.float64, device=rows.device)
            for d, ok in zip(cands, regular.tolist())
        ]
    )[:, 0]
    if not regular.any():
        return hi[0] if hi[0] > 0 else rows.new_ones(())
    return cands[_select_best(scores[:, None])[0]].reshape(())
