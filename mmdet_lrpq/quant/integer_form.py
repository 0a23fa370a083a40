"""Integer forms of the quantizers: the codes an integer pipeline stores, and the log2-with-shift form
of the log-√2 quantizer, in which ``A·V`` becomes two shift-and-add products.

Kept apart from the fake-quant in :mod:`.functional`: only integer pipelines use them, and the tests
hold each to the fake-quant's floats.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..bits import check_bits
from .functional import SQRT2, _log_sqrt2_codes_


def uniform_codes(x: Tensor, delta: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """The integer codes ``clamp(round(x/Δ) + zp, 0, 2^b-1)`` (as float), for integer pipelines."""
    levels = (1 << check_bits(bits)) - 1
    return (torch.round(x / delta) + zero_point).clamp_(0, levels)


def log_sqrt2_codes(x: Tensor, delta: Tensor, bits: int) -> Tensor:
    """Codes ``q = clamp(round(-2·log2(x/Δ)), 0, 2^b)`` as int64; ``2^b`` encodes an exact zero."""
    return _log_sqrt2_codes_(x / delta, 1 << check_bits(bits)).to(torch.int64)


# --------------------------------------------------------------- log2-with-shift inference form
def log2_shift_form(codes: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rewrite log-√2 codes as a log2 quantizer with a shift.

    Returns ``(shift s = ceil(q/2), odd = q mod 2, nonzero = q < 2^b)``. Then
    ``x̂ = 2^-s · Δ_odd`` with two per-tensor scales ``Δ_0 = Δ`` and ``Δ_1 = fl(√2)·Δ``: even codes
    are a plain log2 quantizer, odd codes the same one scaled by √2, so ``A·V`` becomes two
    shift-and-add products, ``Δ·A_even·V + √2Δ·A_odd·V`` (see :func:`log2_shift_matmul_int`).
    """
    levels = 1 << check_bits(bits)
    return (codes + 1) // 2, codes % 2, codes < levels


def log2_shift_scales(delta: Tensor) -> Tensor:
    """``[Δ, fl(√2)·Δ]``: the two scales of the shift form, rounded exactly as RepQ-ViT rounds."""
    odd = torch.tensor([0.0, 1.0], device=delta.device) * (SQRT2 - 1) + 1
    return odd * delta.float().reshape(())


def log2_shift_dequant(codes: Tensor, delta: Tensor, bits: int) -> Tensor:
    """``ldexp(Δ_odd, -s)``: equals :func:`fake_quant_log_sqrt2` bit for bit (outside subnormals)."""
    shift, odd, nonzero = log2_shift_form(codes, bits)
    scale = log2_shift_scales(delta)[odd]
    return torch.where(nonzero, torch.ldexp(scale, -shift.to(scale.dtype)), torch.zeros_like(scale))


def log2_shift_matmul_int(codes: Tensor, v_int: Tensor, bits: int) -> tuple[Tensor, Tensor, int]:
    """Integer-only ``A·V`` for integer ``V``: ``Σ_k V_k << (S - s_k)`` per code parity.

    Returns ``(even_acc, odd_acc, S)`` in int64 such that, exactly in real arithmetic,
    ``dequant(A) @ V = 2^-S · (Δ_0 · even_acc + Δ_1 · odd_acc)`` (scales of
    :func:`log2_shift_scales`). Raises ``ValueError`` where the accumulation could be inexact:
    beyond int64 on the CPU; elsewhere (no integer matmul, e.g. on CUDA) the products run in
    float64, exact while every partial sum stays below 2^53.
    """
    shift, odd, nonzero = log2_shift_form(codes, bits)
    s_max = int(shift[nonzero].max()) if nonzero.any() else 0
    v_int = v_int.to(torch.int64)
    headroom = s_max + math.ceil(math.log2(max(1, int(v_int.abs().max())) * codes.shape[-1] + 1))
    on_cpu = codes.device.type == 'cpu'
    limit = 62 if on_cpu else 53
    if headroom > limit:
        raise ValueError(
            f'integer accumulation needs {headroom} bits (> {limit} on {codes.device.type}): '
            f'use fewer bits or log2_shift_dequant'
        )
    weights = torch.where(nonzero, torch.ones_like(shift) << (s_max - shift).clamp(min=0), torch.zeros_like(shift))
    even_w, odd_w = weights * (1 - odd), weights * odd
    if on_cpu:
        return even_w @ v_int, odd_w @ v_int, s_max
    v = v_int.double()
    return (even_w.double() @ v).to(torch.int64), (odd_w.double() @ v).to(torch.int64), s_max
