"""SQ-b: SmoothQuant with a bias term (MPTQ-ViT, Tai & Wu), folded into LayerNorm -> layer pairs.

Post-LayerNorm activations are asymmetric and their channels differ in range, which a per-tensor
quantizer pays for in clamping and in resolution. SQ-b moves, per input channel ``c`` of the layer,
a shift ``z_c`` into the LayerNorm's bias and a scale ``s_c`` into the layer's weights, from the float
channel ranges ``[lo_c, hi_c]`` of the layer's input on the calibration images::

    z_c = (lo_c + hi_c) / 2                          (the bias term: centres each channel)
    a_c = max(|x_c - z_c|) = (hi_c - lo_c) / 2,      w_c = max_o |W[o, c]|
    s_c = a_c^α / w_c^(1-α)                          (SmoothQuant's migration, strength α)
    x' = (x - z) / s                                 (LayerNorm: γ ← γ/s, β ← (β - z)/s)
    W' = W·diag(s),  bias' = bias + W·z              (the layer computes W x + bias exactly)

It is the same fold as RepQ's (:func:`~.reparam.fold_scale_shift_` with ``r = s``, ``b = z/s``), so it
is exact in float and the shift of a ``norm1 -> qkv`` pair moves behind Swin's window padding the same
way. Only the statistics differ: float ranges over all calibration images, not calibrated quantizer
parameters, and ``α`` shares the range between activations and weights. ``a_c`` and ``w_c`` are
clamped at ``1e-5`` (SmoothQuant's guard against an empty channel).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .modules import QuantConv2d, QuantLinear
from .reparam import check_foldable, fold_scale_shift_

DEFAULT_ALPHA = 0.5
_MIN_RANGE = 1e-5


@dataclass
class SmoothResult:
    """What one SQ-b fold did: the norm now emits ``x/r - b`` (``r = s``, ``b = z/s``)."""

    r: Tensor
    b: Tensor


class ChannelRanges:
    """Running per-channel ``[lo, hi]`` of a layer's input (channels last for Linear, dim 1 for Conv2d)."""

    def __init__(self) -> None:
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None

    def add(self, x: Tensor, channel_axis: int) -> None:
        if x.numel() == 0:
            return
        rows = x.detach().float().movedim(channel_axis, -1).reshape(-1, x.shape[channel_axis])
        lo, hi = torch.aminmax(rows, dim=0)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def check(self, where: str) -> None:
        """Raise ``ValueError`` if no input was recorded or it held NaN/Inf (reads the values: once,
        after the pass, not per batch)."""
        if self.lo is None:
            raise ValueError(f'SQ-b: {where} received no input in the float pass over the calibration images')
        assert self.hi is not None  # (recorded together with lo)
        if not bool(torch.isfinite(self.lo).all() & torch.isfinite(self.hi).all()):
            raise ValueError(f'SQ-b: the input of {where} has NaN or Inf values; check the model/input for overflow')


@contextmanager
def recording_ranges(layers: dict[str, nn.Module]) -> Iterator[dict[str, ChannelRanges]]:
    """Inside: every forward of each layer adds its input to that layer's :class:`ChannelRanges`."""
    ranges = {name: ChannelRanges() for name in layers}
    handles = []
    for name, layer in layers.items():
        axis = 1 if isinstance(layer, nn.Conv2d) else -1
        handles.append(
            layer.register_forward_pre_hook(lambda _m, args, r=ranges[name], axis=axis: r.add(args[0], axis))
        )
    try:
        yield ranges
    finally:
        for h in handles:
            h.remove()


def sqb_factors(lo: Tensor, hi: Tensor, weight: Tensor, alpha: float = DEFAULT_ALPHA) -> tuple[Tensor, Tensor]:
    """SQ-b's per-channel scale ``s`` and shift ``z`` (module docstring) from the input's channel range
    and the consuming layer's weight ``[out, in, ...]``; float32, on ``lo``'s device."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f'SQ-b migration strength alpha must be in [0, 1], got {alpha}')
    z = (lo + hi) / 2
    a = ((hi - lo) / 2).clamp(min=_MIN_RANGE)
    w = weight.detach().float().transpose(0, 1).reshape(weight.shape[1], -1).abs().amax(dim=1).clamp(min=_MIN_RANGE)
    return a.pow(alpha) / w.pow(1.0 - alpha), z


@torch.no_grad()
def smooth_(
    norm: nn.LayerNorm, layer: QuantLinear | QuantConv2d, ranges: ChannelRanges, alpha: float = DEFAULT_ALPHA
) -> SmoothResult:
    """Fold SQ-b into ``norm -> layer`` in place from ``layer``'s recorded input ranges."""
    check_foldable(norm, layer, 'SQ-b')
    if ranges.lo is None:
        raise ValueError('SQ-b needs the layer input ranges: the layer received no input in the float pass')
    if ranges.lo.numel() != norm.weight.numel():
        raise ValueError(f'LayerNorm has {norm.weight.numel()} channels, the layer input {ranges.lo.numel()}')
    assert ranges.hi is not None  # (recorded together with lo)
    s, z = sqb_factors(ranges.lo, ranges.hi, layer.weight, alpha)
    b = z / s
    fold_scale_shift_(norm, layer, s, b)
    return SmoothResult(r=s, b=b)


__all__ = ['DEFAULT_ALPHA', 'ChannelRanges', 'SmoothResult', 'recording_ranges', 'sqb_factors', 'smooth_']
