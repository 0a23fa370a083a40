"""The integer form of each quantizer: what an ONNX graph must store and compute to reproduce it.

Pure PyTorch/NumPy (no ``onnx`` here). Each form is read off a *calibrated, quantized* module and
checked against the PyTorch computation it stands for, so that a form that would not reproduce
the model is an error here instead of a silently different graph:

* :class:`WeightForm` — a weight's integer codes, per output channel scale and zero point, stored
  in the narrowest carrier that holds them (``int4`` for ≤ 4-bit weights at opset ≥ 21, else
  ``uint8``; wider only if the zero points need it). The codes are read back from the model's own
  fake-quantized weight (so learned AdaRound rounding is kept) and ``(code - zp)·Δ`` is verified to
  give that weight bit for bit.
* :class:`UniformActForm` — an activation quantizer ``clamp(round(x/Δ), -zp, L-zp)·Δ`` as
  QuantizeLinear → (Clip) → DequantizeLinear. ``L + 1 = 2^b`` levels are enforced: a 4-bit
  activation carried in ``uint8`` is clipped to its 16 codes (or carried in ``uint4``).
  A *fractional* zero point (RepQ's reparameterized target ``z̃`` when not rounded) has ``2^b + 1``
  output levels, which no ``b``-bit integer carrier holds: it is exported exactly in float ops
  (``policy='exact'``, the default) or as QDQ with ``round(z̃)`` (``policy='round'``, not the
  evaluated model: its differences are measured by the parity check).
* :class:`LogSqrt2Form` — RepQ-ViT's log-√2 quantizer, which has no ONNX operator: the code of
  ``x`` is found from thresholds ``X_k`` (the smallest float whose code is ≤ k, found by bisection on
  the float32 bit patterns with the model's own quantizer) and the value read from the per-code
  table, so the graph reproduces PyTorch's codes exactly, including at code boundaries where a
  different ``log`` implementation would round the other way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..quant.functional import fake_quant_log_sqrt2, log_sqrt2_table


class ExportError(ValueError):
    """The model cannot be exported as asked; the message names the site(s) and the fix."""


@dataclass(frozen=True)
class Carrier:
    """An ONNX integer element type that holds quantized codes."""

    name: str
    lo: int
    hi: int
    min_opset: int
    signed: bool

    @property
    def bits(self) -> int:
        return int(math.log2(self.hi - self.lo + 1))


CARRIERS = {
    c.name: c
    for c in (
        Carrier('uint8', 0, 255, 10, False),
        Carrier('int8', -128, 127, 10, True),
        Carrier('uint4', 0, 15, 21, False),
        Carrier('int4', -8, 7, 21, True),
        Carrier('uint16', 0, 65535, 21, False),
        Carrier('int16', -32768, 32767, 21, True),
    )
}
INT4_OPSET = 21


def _plural(items: list[str], limit: int = 6) -> str:
    shown = ', '.join(items[:limit])
    return shown + (f', ... ({len(items)} in all)' if len(items) > limit else '')


# ----------------------------------------------------------------------------- weights
@dataclass
class WeightForm:
    """``w = (stored - stored_zp) · scale`` per output channel (axis 0 of the weight)."""

    site: str
    bits: int
    stored: np.ndarray  # integer values in the carrier's range (int64 here)
    scale: np.ndarray  # float32 [out]
    stored_zp: np.ndarray  # int64 [out]
    carrier: Carrier

    @property
    def nbytes(self) -> int:
        """Bytes of the stored codes (packed for 4-bit carriers) plus scales and zero points."""
        codes = math.ceil(self.stored.size * self.carrier.bits / 8)
        return codes + self.scale.nbytes + math.ceil(self.stored_zp.size * self.carrier.bits / 8)


def weight_form(site: str, quantizer, fq_weight: Tensor, opset: int) -> WeightForm:
    """The integer form of a per-output-channel weight quantizer and its fake-quantized weight."""
    bits = quantizer.bits
    levels = (1 << bits) - 1
    w = fq_weight.detach().float().cpu()
    delta = quantizer.delta.detach().float().cpu().reshape(-1)
    zp = quantizer.zero_point.detach().float().cpu().reshape(-1)
    out = w.shape[0]
    if delta.numel() == 1 and out > 1:
        delta, zp = delta.expand(out), zp.expand(out)
    if delta.numel() != out:
        raise ExportError(
            f'{site}: weight quantizer has {delta.numel()} scales for {out} output channels; only '
            f'per-output-channel (axis 0) or per-tensor weights can be exported'
        )
    if not bool((zp == zp.round()).all()):
        raise ExportError(f'{site}: weight zero point is not an integer; recalibrate the weights')
    shape = (-1,) + (1,) * (w.dim() - 1)
    k = torch.round(w / delta.view(shape))
    if not torch.equal(k * delta.view(shape), w):  # the stored codes must give the model's weight exactly
        bad = int((k * delta.view(shape) != w).sum())
        raise ExportError(
            f'{site}: {bad} weight values are not integer multiples of their scale, so no integer '
            f'form reproduces them; is this weight fake-quantized by its own quantizer?'
        )
    codes = (k + zp.view(shape)).to(torch.int64)
    if int(codes.min()) < 0 or int(codes.max()) > levels:
        raise ExportError(f'{site}: weight codes outside 0..{levels} for {bits} bits')
    zp_i = zp.to(torch.int64)
    # uint8 for 5..8 bits: x86 CPUs without VNNI multiply uint8 x int8 with 16-bit saturating pair sums
    # (vpmaddubsw), which full-range int8 weights overflow (measured: 8 % output error in ONNX Runtime's
    # MatMulIntegerToFloat on AVX2); uint8 x uint8 kernels widen first and stay exact
    want = (['int4'] if bits <= 4 else []) + ['uint8', 'int8', 'int16']
    lo = min(int(codes.min()), int(zp_i.min()))
    hi = max(int(codes.max()), int(zp_i.max()))
    for name in want:
        c = CARRIERS[name]
        if c.min_opset > opset:
            continue
        # shift s: stored = code - s must fit, the preferred s centres 0..2^n-1 on the signed range
        s_lo, s_hi = hi - c.hi, lo - c.lo
        if s_lo > s_hi:
            continue
        s = min(max(-c.lo, s_lo), s_hi)
        return WeightForm(site, bits, (codes - s).numpy(), delta.numpy().astype(np.float32), (zp_i - s).numpy(), c)
    raise ExportError(
        f'{site}: the weight codes and zero points span {lo}..{hi}, which no integer carrier at '
        f'opset {opset} holds; export with opset={INT4_OPSET} or recalibrate the weights'
    )


# ----------------------------------------------------------------------------- uniform activations
@dataclass
class UniformActForm:
    """``clamp(round(x/Δ), -zp, L-zp)·Δ``; ``carrier`` None means exact float ops (fractional zp)."""

    site: str
    bits: int
    scale: np.ndarray  # float32, scalar or [C]
    zero_point: np.ndarray  # float32 as calibrated, scalar or [C]
    axis: int | None  # channel axis of per-channel input quantizers
    carrier: Carrier | None = None
    carrier_zp: np.ndarray | None = None  # int64, the zero point in the carrier
    clip: tuple[np.ndarray, np.ndarray] | None = None  # carrier-range clip that enforces 2^b levels
    note: str = ''

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def integer(self) -> bool:
        return self.carrier is not None


FRACTIONAL_POLICIES = ('exact', 'round', 'error')


def uniform_act_form(
    site: str, quantizer, opset: int, fractional: str = 'exact', int4_activations: bool = False
) -> UniformActForm:
    """The QDQ form of an activation quantizer (see module docstring for ``fractional``)."""
    if fractional not in FRACTIONAL_POLICIES:
        raise ValueError(f'fractional_zero_point must be one of {FRACTIONAL_POLICIES}, got {fractional!r}')
    bits = quantizer.bits
    delta = quantizer.delta.detach().float().cpu().numpy().astype(np.float32)
    zp = quantizer.zero_point.detach().float().cpu().numpy().astype(np.float32)
    axis = quantizer.channel_axis if delta.size > 1 else None
    delta, zp = (delta.reshape(-1), zp.reshape(-1)) if axis is not None else (delta.reshape(()), zp.reshape(()))
    form = UniformActForm(site, bits, delta, zp, axis)
    z = zp.astype(np.float64)
    if not np.all(z == np.round(z)):
        if fractional == 'exact':
            form.note = (
                'fractional zero point: 2^b+1 output levels, exported exactly in float ops '
                '(quantize with round_zero_point=True for an integer form)'
            )
            return form
        if fractional == 'error':
            raise ExportError(
                f'{site}: fractional zero point {float(np.ravel(z)[0]):.4f} (RepQ reparameterization without '
                f'round_zero_point): no {bits}-bit integer carrier reproduces it; quantize with '
                f"round_zero_point=True, or export with fractional_zero_point='exact' or 'round'"
            )
        z = np.round(z)
        form.note = 'fractional zero point rounded (not the evaluated model: see the parity figures)'
    levels = form.levels
    order = (['uint4', 'int4'] if int4_activations and bits <= 4 else []) + ['uint8', 'int8', 'uint16', 'int16']
    zi = z.astype(np.int64)
    for name in order:
        c = CARRIERS[name]
        if c.min_opset > opset:
            continue
        # carrier zero point Z': Z' in range, Z' - z >= lo and Z' - z + L <= hi for every channel
        low = np.maximum(c.lo, zi + c.lo)
        high = np.minimum(c.hi, zi + c.hi - levels)
        if np.any(low > high):
            continue
        zc = np.clip(zi, low, high)
        lo_b, hi_b = zc - zi, zc - zi + levels
        form.carrier, form.carrier_zp = c, zc
        if np.any(lo_b > c.lo) or np.any(hi_b < c.hi):
            form.clip = (lo_b, hi_b)
        return form
    raise ExportError(
        f'{site}: activation zero point {int(np.ravel(zi)[0])} with {bits} bits fits no integer carrier '
        f'at opset {opset} (its codes must stay inside the carrier around it); export with '
        f'opset={INT4_OPSET} (16-bit carriers) or recalibrate this quantizer'
    )


# ----------------------------------------------------------------------------- log-sqrt2
@dataclass
class LogSqrt2Form:
    """Code ``q = #{k : x < X_k}`` (``X`` decreasing), value ``table[q]``; ``q = 2^b`` is zero."""

    site: str
    bits: int
    delta: float
    thresholds: np.ndarray  # float32 [2^b]
    table: np.ndarray  # float32 [2^b + 1]
    note: str = 'log-sqrt2: exact, in standard float ops (no ONNX operator)'


def _codes_from_values(values: Tensor, table: Tensor) -> Tensor:
    """Index of each fake-quantized value in the (strictly decreasing) per-code table."""
    eq = values.reshape(-1, 1) == table.reshape(1, -1)
    if not bool(eq.any(dim=1).all()):
        raise ExportError('log-sqrt2 quantizer produced a value outside its code table')
    return eq.float().argmax(dim=1).reshape(values.shape)


def log_sqrt2_form(site: str, quantizer) -> LogSqrt2Form:
    """Thresholds by bisection on float32 bit patterns, with the model's own quantizer function."""
    bits = quantizer.bits
    delta = quantizer.delta.detach().float().cpu().reshape(())
    levels = 1 << bits
    table = log_sqrt2_table(delta, bits)  # [levels + 1], last entry 0

    def code(bits_i32: Tensor) -> Tensor:
        x = bits_i32.to(torch.int32).view(torch.float32).contiguous()
        return _codes_from_values(fake_quant_log_sqrt2(x, delta, bits), table)

    k = torch.arange(levels, dtype=torch.int64)
    lo = torch.zeros(levels, dtype=torch.int64)  # x = 0: code 2^b > k
    top = torch.tensor([float(delta) * 4.0], dtype=torch.float32).view(torch.int32).to(torch.int64)
    hi = top.expand(levels).clone()  # x = 4Δ: code 0 <= k
    if bool((code(lo) <= k).any()) or bool((code(hi) > k).any()):
        raise ExportError(f'{site}: log-sqrt2 codes are not monotone at the search bounds')
    while bool(((hi - lo) > 1).any()):
        mid = (lo + hi) // 2
        ok = code(mid) <= k
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    thresholds = hi.to(torch.int32).view(torch.float32)
    if not bool((thresholds[1:] <= thresholds[:-1]).all()):
        raise ExportError(f'{site}: log-sqrt2 thresholds are not decreasing; the quantizer is not monotone')
    return LogSqrt2Form(site, bits, float(delta), thresholds.numpy().copy(), table.numpy().astype(np.float32))


def log_sqrt2_reference_codes(form: LogSqrt2Form, x: np.ndarray) -> np.ndarray:
    """The codes the exported graph computes (``#{k: x < X_k}``), for tests and parity reports."""
    return (x[..., None] < form.thresholds).sum(-1)


@dataclass
class Forms:
    """Every quantizer's form in one exported module, by site, plus what could not be integer."""

    weights: dict[str, WeightForm] = field(default_factory=dict)
    acts: dict[str, UniformActForm] = field(default_factory=dict)
    logs: dict[str, LogSqrt2Form] = field(default_factory=dict)
