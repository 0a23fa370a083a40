"""Test oracle: RepQ-ViT's quantizer calibration written plainly, one channel at a time.

This restates the semantics of RepQ-ViT's ``UniformQuantizer.init_quantization_scale`` and
``LogSqrt2Quantizer`` (percentile candidates via ``torch.quantile``, MSE ``mean(|x̂ - x|^2)``,
strictly-lower score wins, Python loop over channels) so that the vectorized implementation in
``mmdet_lrpq.quant.functional`` can be checked against it. Deliberately slow and literal.
"""

from math import sqrt

import torch

PCTS = (0.999, 0.9999, 0.99999)


def _quantize(x, x_max, x_min, bits):
    delta = (x_max - x_min) / (2**bits - 1)
    zero_point = (-x_min / delta).round()
    x_int = torch.round(x / delta)
    x_quant = torch.clamp(x_int + zero_point, 0, 2**bits - 1)
    return (x_quant - zero_point) * delta


def uniform_per_tensor(x, bits):
    x = x.clone().detach()
    best, delta, zp = 1e10, None, None
    for pct in PCTS:
        new_max = torch.quantile(x.reshape(-1), pct)
        new_min = torch.quantile(x.reshape(-1), 1.0 - pct)
        score = (_quantize(x, new_max, new_min, bits) - x).abs().pow(2).mean()
        if score < best:
            best = score
            delta = (new_max - new_min) / (2**bits - 1)
            zp = (-new_min / delta).round()
    return delta, zp


def uniform_per_channel(x, bits):
    """Channel = dim 0 for 2-D/4-D weights, last dim for [B, N, C] activations (RepQ-ViT)."""
    n = x.shape[-1] if x.dim() == 3 else x.shape[0]
    deltas, zps = torch.empty(n), torch.empty(n)
    for c in range(n):
        deltas[c], zps[c] = uniform_per_tensor(x[:, :, c] if x.dim() == 3 else x[c], bits)
    shape = (1, 1, -1) if x.dim() == 3 else (-1,) + (1,) * (x.dim() - 1)
    return deltas.view(shape), zps.view(shape)


def uniform_fake_quant(x, delta, zp, bits):
    return (torch.clamp(torch.round(x / delta) + zp, 0, 2**bits - 1) - zp) * delta


def log_sqrt2_quantize(x, delta, bits):
    x_int = torch.round(-1 * (x / delta).log2() * 2)
    mask = x_int >= 2**bits
    x_quant = torch.clamp(x_int, 0, 2**bits - 1)
    odd_mask = (x_quant % 2) * (sqrt(2) - 1) + 1
    x_float_q = 2 ** (-1 * torch.ceil(x_quant / 2)) * odd_mask * delta
    x_float_q[mask] = 0
    return x_float_q


def log_sqrt2_delta(x, bits):
    x = x.clone().detach()
    best, delta = 1e10, x.max()
    for pct in PCTS:
        new_delta = torch.quantile(x.reshape(-1), pct)
        score = (log_sqrt2_quantize(x, new_delta, bits) - x).abs().pow(2).mean()
        if score < best:
            best, delta = score, new_delta
    return delta
