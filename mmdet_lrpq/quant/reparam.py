"""Scale reparameterization of post-LayerNorm activations: RepQ-ViT, and CRL (LRP-QViT §3.2.1).

Setting: a LayerNorm (affine ``γ, β``) feeds a layer that is linear in its input channels (a
``QuantLinear``, or a 1×1 ``QuantConv2d`` such as an FPN lateral). Post-LayerNorm activations have
very different ranges per channel, so the layer's input was calibrated per channel,
``(Δ_c, zp_c)``. Reparameterization moves the per-channel part into the LayerNorm affine and
the layer's weights so that a single per-tensor quantizer ``(Δ̃, z̃)`` can be used at inference.

**RepQ** (docs/method.md)::

    Δ̃ = mean_c Δ_c,   z̃ = mean_c zp_c   (optionally rounded)
    r_c = Δ_c / Δ̃,    b_c = (-zp_c·Δ_c) / r_c + z̃·Δ̃
    γ ← γ / r,        β ← β / r - b
    W[:, c] ← W[:, c] · r_c,   bias ← bias + W_new · b      (bias created if absent)

In float this is an identity (``W_new (x/r - b) + bias_new = W x + bias``). With quantization it
is exact when ``z̃`` is an integer: ``round(x'/Δ̃) + z̃ = round(x/Δ_c) + zp_c`` for
``x' = x/r - b``, so the per-tensor quantizer on the reparameterized input reproduces the
per-channel one (RepQ-ViT leaves ``z̃`` fractional; ``round_zero_point=True`` makes it exact).

**CRL(k)** — clipped channel-wise quantization with reparameterization. RepQ migrates the
per-channel scale factors ``r_c`` into the next layer's weight columns; a few outlier channels
with large ``Δ_c`` blow up their columns and with them the range of every per-output-channel
weight quantizer. CRL first clips the per-channel parameters at ``k`` standard deviations
around their across-channel mean, then applies RepQ toward the clipped parameters::

    Δ'_c = clamp(Δ_c, max(μ_Δ - kσ_Δ, min_c Δ_c), μ_Δ + kσ_Δ)
    m'_c = clamp(m_c, μ_m - kσ_m, μ_m + kσ_m)        with m_c = -zp_c·Δ_c (the channel's lower bound)
    zp'_c = round(-m'_c / Δ'_c)                      (σ: population standard deviation over channels)

so outlier channels are quantized with a clipped range (they saturate rather than costing every
other channel weight resolution), and ``r_c`` stays within ``(μ_Δ + kσ_Δ)/Δ̃``. ``k = ∞`` leaves the
parameters untouched and is exactly RepQ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .modules import QuantConv2d, QuantLinear


@dataclass
class ReparamResult:
    """What one reparameterization did (for logs and for modules that must follow it).

    The scalars stay 0-d tensors on the layer's device until read, so that reparameterizing a model
    on an accelerator does not wait for the device after every layer.
    """

    r: Tensor  # per-channel scale migrated into the next layer
    b: Tensor  # per-channel shift: the new LayerNorm outputs x/r - b
    target: tuple[Tensor, Tensor]  # (Δ̃, z̃) of the per-tensor input quantizer
    clipped: Tensor  # number of channels whose parameters CRL clipped (int64)

    @property
    def target_delta(self) -> float:
        return float(self.target[0])

    @property
    def target_zero_point(self) -> float:
        return float(self.target[1])

    @property
    def n_clipped(self) -> int:
        return int(self.clipped)


def crl_clip(delta: Tensor, zero_point: Tensor, k: float) -> tuple[Tensor, Tensor, Tensor]:
    """Clip per-channel ``(Δ_c, zp_c)`` at ``k`` standard deviations (see module docstring).

    Returns the clipped parameters and the number of channels that changed, as a 0-d int64 tensor
    on their device (counting on the host would wait for the device).
    """
    if math.isinf(k):
        return delta, zero_point, delta.new_zeros((), dtype=torch.int64)
    if not k > 0:
        raise ValueError(f'CRL clipping needs k > 0 standard deviations (or inf for RepQ), got {k}')
    low = -zero_point * delta
    mu_d, sd_d = delta.mean(), delta.std(unbiased=False)
    mu_m, sd_m = low.mean(), low.std(unbiased=False)
    delta_c = delta.clamp(torch.maximum(mu_d - k * sd_d, delta.min()), mu_d + k * sd_d)
    low_c = low.clamp(mu_m - k * sd_m, mu_m + k * sd_m)
    zp_c = (-low_c / delta_c).round()
    clipped = (delta_c != delta) | (zp_c != zero_point)
    return delta_c, zp_c, clipped.sum()


def check_foldable(norm: nn.LayerNorm, layer: nn.Module, what: str) -> None:
    """Raise ``ValueError`` unless a per-channel scale and shift can move from ``norm`` into ``layer``."""
    if not norm.elementwise_affine or norm.weight is None or norm.bias is None:
        raise ValueError(f'{what} needs a LayerNorm with affine weight and bias')
    if isinstance(layer, nn.Conv2d) and (layer.kernel_size != (1, 1) or layer.groups != 1):
        raise ValueError('only a 1x1, ungrouped convolution is linear per input channel')


@torch.no_grad()
def reparameterize_(
    norm: nn.LayerNorm, layer: QuantLinear | QuantConv2d, k: float = math.inf, round_zero_point: bool = False
) -> ReparamResult:
    """Apply RepQ (``k = inf``) or CRL(k) to ``norm -> layer`` in place (see module docstring).

    ``layer.input_quantizer`` must hold per-channel parameters (calibrated); afterwards it is
    per tensor, and the layer's weight quantization follows the new weights automatically.
    The arithmetic runs in the qparams' float32; parameters keep their own dtype.
    """
    quantizer = layer.input_quantizer
    if not quantizer.calibrated or quantizer.channel_axis is None:
        raise ValueError('reparameterization needs the layer input calibrated per channel first')
    check_foldable(norm, layer, 'reparameterization')
    delta = quantizer.delta.reshape(-1).float()
    zp = quantizer.zero_point.reshape(-1).float()
    if delta.numel() != norm.weight.numel():
        raise ValueError(f'LayerNorm has {norm.weight.numel()} channels, the layer input {delta.numel()}')
    delta, zp, clipped = crl_clip(delta, zp, k)

    target_delta = delta.mean()
    target_zp = zp.mean().round() if round_zero_point else zp.mean()
    r = delta / target_delta
    b = (-zp * delta) / r - (-target_zp * target_delta)

    fold_scale_shift_(norm, layer, r, b)
    quantizer.set_qparams(target_delta.reshape(()), target_zp.reshape(()), channel_axis=None)
    return ReparamResult(r=r, b=b, target=(target_delta, target_zp), clipped=clipped)


@torch.no_grad()
def fold_scale_shift_(norm: nn.LayerNorm, layer: QuantLinear | QuantConv2d, r: Tensor, b: Tensor) -> None:
    """Make ``norm`` emit ``x/r - b`` per channel and ``layer`` compensate, in place (exact in float).

    ``γ ← γ/r``, ``β ← β/r - b``, ``W[:, c] ← W[:, c]·r_c``, ``bias ← bias + W_new·b`` (created if
    absent). RepQ/CRL derive ``r, b`` from the calibrated per-channel quantizer; SQ-b
    (:mod:`.smooth`) from float channel ranges. ``r, b``: float32 ``[C]``; parameters keep their dtype.
    """
    norm.weight.data = (norm.weight.data / r).to(norm.weight.dtype)
    norm.bias.data = (norm.bias.data / r - b).to(norm.bias.dtype)
    w = layer.weight.data
    r_cols = r.view(1, -1, *([1] * (w.dim() - 2)))
    layer.weight.data = (w * r_cols).to(w.dtype)
    w_new = layer.weight.data.float()  # the weights the layer now has, whatever their dtype
    shift = (w_new.flatten(2).sum(-1) if w.dim() > 2 else w_new) @ b
    if layer.bias is None:
        layer.bias = nn.Parameter(shift.to(w.dtype))
    else:
        layer.bias.data = (layer.bias.data + shift).to(layer.bias.dtype)
