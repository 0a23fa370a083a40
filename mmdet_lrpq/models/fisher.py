"""Measured sensitivity of a model's own loss to quantizing each site, per bit-width (HAWQ / LampQ style).

The LRP scores rank layers of the *classification* Swin; this measures the model being quantized,
on its calibration images, with its own task loss ``L``. For a Conv2d/Linear site ``s`` quantized
at ``b`` bits (weights and input, everything else float), the second-order change of ``L`` is
approximated with the Fisher diagonal (the squared gradients at the float model)::

    S(s, b) = 1/(2N) Σ_images [ Σ_w (∂L/∂w)² (Q_b(w) - w)²  +  Σ_x (∂L/∂x)² (Q_b(x) - x)² ]

``Q_b``: the quantizers of the real protocol at ``b`` bits — per-output-channel weights, the input
per tensor, or per channel where the driver calibrates it per channel before reparameterization
(RepQ's reparameterization reproduces that per-channel quantization), calibrated on each image
(RepQ-ViT's percentile/MSE search). An input pinned to fixed bits (the patch embedding's 8)
contributes at those bits for every ``b``. One forward and backward per image gives every site
and every bit-width at once. The weight term uses the float weights: the column scaling that
reparameterization applies later is not modelled.

``assignment=`` (LampQ's iterative update, :func:`mmdet_lrpq.plan.allocate_lampq`) re-measures the
table *given* a plan: every assigned Conv2d/Linear site runs quantized at its ``(w_bits, a_bits)``
(weights per output channel, the input per image as above, straight-through gradients), so the
gradients are taken at the quantized model instead of the float one; ``Q_b(w) - w`` and
``Q_b(x) - x`` stay the errors of quantizing the site's float weights and its (now upstream-
quantized) input at ``b``. A site's own assigned quantization is part of that operating point
(measuring each site with only the others quantized would need one pass per site). Matmuls stay float.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..plan import Site
from ..quant import fake_quant_uniform, uniform_qparams


def _quant_error(x: Tensor, bits: int, channel_axis: int | None) -> Tensor:
    delta, zero_point = uniform_qparams(x, bits, channel_axis)
    return fake_quant_uniform(x, delta, zero_point, bits) - x


def fisher_sensitivity(
    model: nn.Module,
    sites: Sequence[Site],
    levels: Sequence[int],
    batches: Iterable,
    loss: Callable[[nn.Module, Any], Tensor],
    *,
    per_channel_inputs: frozenset = frozenset(),
    fixed_a_bits: Mapping[str, int] | None = None,
    progress: Callable[[int], None] | None = None,
    assignment: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, dict[int, float]]:
    """``S(site, bits)`` (module docstring) for every Conv2d/Linear site of the float ``model``.

    ``loss(model, batch)``: the scalar task loss of one calibration batch (one image per batch
    keeps the Fisher a per-image expectation); ``per_channel_inputs``: sites whose input is
    calibrated per channel; ``fixed_a_bits``: site -> input bits that do not follow ``bits``;
    ``assignment``: site -> ``(w_bits, a_bits)`` to measure at instead of the float model (module doc).
    The model's parameters keep their values; their gradients are cleared afterwards.
    """
    modules = dict(model.named_modules())
    weighted = [s for s in sites if s.has_weights]
    fixed_a_bits = dict(fixed_a_bits or {})
    grad_sq = {s.name: torch.zeros_like(modules[s.name].weight) for s in weighted}
    act = {s.name: {b: 0.0 for b in levels} for s in weighted}
    inputs: dict[str, list[Tensor]] = {}
    assignment = {s.name: assignment[s.name] for s in weighted if s.name in (assignment or {})}

    def input_axis(name: str) -> int | None:
        return (1 if isinstance(modules[name], nn.Conv2d) else -1) if name in per_channel_inputs else None

    def capture(name: str):
        def hook(module, args):
            # this site's own handle on its input: its gradient is what flows through this site alone,
            # not the total of every consumer of the tensor (a residual stream feeds several)
            x = args[0].view_as(args[0]) if args[0].requires_grad else args[0].detach().requires_grad_(True)
            if x.grad_fn is not None:
                x.retain_grad()
            inputs.setdefault(name, []).append(x)
            if name in assignment and x.numel():  # run quantized at the assigned input bits (straight-through)
                a_bits = fixed_a_bits.get(name, assignment[name][1])
                delta, zero_point = uniform_qparams(x.detach(), a_bits, input_axis(name))
                return (x + (fake_quant_uniform(x.detach(), delta, zero_point, a_bits) - x.detach()), *args[1:])
            return (x, *args[1:])

        return hook

    float_weights: dict[str, Tensor] = {}
    handles = [modules[s.name].register_forward_pre_hook(capture(s.name)) for s in weighted]
    n = 0
    try:
        with torch.no_grad():  # the assigned weights, restored below
            for name, (w_bits, _) in assignment.items():
                w = modules[name].weight
                float_weights[name] = w.detach().clone()
                w.add_(_quant_error(float_weights[name], w_bits, 0))
        for batch in batches:
            inputs.clear()
            model.zero_grad(set_to_none=True)
            loss(model, batch).backward()
            with torch.no_grad():
                for s in weighted:
                    w = modules[s.name].weight
                    if w.grad is not None:
                        grad_sq[s.name] += w.grad.pow(2)
                    xs = [x for x in inputs.get(s.name, []) if x.grad is not None and x.numel()]
                    if not xs:
                        continue
                    axis = input_axis(s.name)
                    for b in levels:
                        a_bits = fixed_a_bits.get(s.name, b)
                        # the first input fixes the quantizer (RepQ-ViT's protocol); later calls reuse it
                        delta, zero_point = uniform_qparams(xs[0].detach(), a_bits, axis)
                        act[s.name][b] += float(
                            sum(
                                (
                                    x.grad.pow(2)
                                    * (fake_quant_uniform(x.detach(), delta, zero_point, a_bits) - x.detach()).pow(2)
                                ).sum()
                                for x in xs
                            )
                        )
            n += 1
            if progress is not None:
                progress(n)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, w in float_weights.items():
                modules[name].weight.copy_(w)
        inputs.clear()
        model.zero_grad(set_to_none=True)
    if not n:
        raise ValueError('fisher_sensitivity: no calibration batches were given')
    out: dict[str, dict[int, float]] = {}
    with torch.no_grad():
        for s in weighted:
            w = modules[s.name].weight.detach()
            out[s.name] = {
                b: (float((grad_sq[s.name] * _quant_error(w, b, 0).pow(2)).sum()) + act[s.name][b]) / (2 * n)
                for b in levels
            }
    return out


__all__ = ['fisher_sensitivity']
