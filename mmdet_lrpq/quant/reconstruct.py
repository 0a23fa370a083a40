"""Optional reconstruction after calibration (BRECQ / QDrop family): learned rounding and step sizes.

Off by default: LRP-QViT and RepQ-ViT stop after calibration. With a :class:`ReconstructConfig`,
the calibrated, reparameterized model then learns, unit by unit on the calibration images, the
two things calibration fixes by rule: per weight, whether to round down or up (AdaRound) instead
of to nearest, and per activation quantizer its step size ``Δ`` (LSQ, zero points kept), so that
each unit's quantized output matches its float output. Weights, biases and norms do not change.

**Units.** Blocks (an architecture adapter's chain: the patch embedding, Swin blocks, patch
mergings) are reconstructed whole, in forward order, each on its inputs in the quantized model so
far towards the float block's output on the float model's inputs (asymmetric, QDrop mixing in the
float inputs); their float and quantized inputs are cached for one unit at a time and propagated
through it once it is learned, so memory is three copies of one unit's inputs for the
reconstruction images (``num_images`` bounds them). The quantized layers after the blocks
(``heads``): ``'layer'`` — each alone, on a sample of at most ``max_rows`` of its input rows
(tokens, RoIs, or im2col patches), captured in one forward of the model per top-level group
(``neck``, ``rpn_head``, ``roi_head``); ``'module'`` — head units given by the caller (the neck and
RPN head asymmetric like blocks; RoI heads on sampled RoIs of the quantized model, towards the float
head on the same RoIs). Groups and head units go in module order, each captured after everything
before it is learned.

**Loss** of a unit over a batch, with float outputs ``y_t`` and quantized outputs ``ŷ_t``::

    L = mean_t Σ (ŷ_t - y_t)² / Σ y_t²  +  λ · mean_i (1 - |2 h(V_i) - 1|^β)

``h(V) = clamp(σ(V)(ζ - γ) + γ, 0, 1)`` (ζ = 1.1, γ = -0.1) is AdaRound's soft rounding of weight
``i``, initialised to its fractional part; the weight is ``Δ_w·clamp(floor(w/Δ_w) + h, -zp, 2^b-1-zp)``.
β anneals from ``beta[0]`` to ``beta[1]`` after ``warmup`` of the steps (no regularizer before), then
``h`` is hardened to ``V ≥ 0``. Steps are learned as ``Δ = Δ₀·exp(s)``; rounding in the activation
quantizers passes the gradient straight through. Where a unit learns from float inputs, each
activation (and input element) keeps its float value with probability ``drop_prob`` (QDrop).
Adam, ``iters`` steps per unit, ``batch_size`` calibration samples (blocks) or ``batch_rows`` rows
(layers) per step.

Deterministic for a seed: batches are drawn by a seeded Python RNG, QDrop masks and row samples by
a seeded generator on the model's device. Pure PyTorch.

This module is the driver, which takes the units in order. The settings are in
:mod:`.reconstruct_config`, the units and the data they learn from in :mod:`.reconstruct_units`,
the learners, the loss and the loops in :mod:`.reconstruct_learning`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from .modules import QuantConv2d, QuantLinear, QuantModule
from .reconstruct_config import ReconstructConfig
from .reconstruct_learning import _layer_error, _learn_layer, _reconstruct_unit
from .reconstruct_units import Unit, _capture_inputs, _capture_rows, _cat_rows, _Feed, _reconstructible, _Rng


def reconstruct_(
    model: nn.Module,
    chains: Sequence[Sequence[Unit]],
    heads: Sequence[Unit],
    layers: dict[str, QuantModule],
    batches: Callable[[], Iterable],
    run: Callable[[nn.Module, Any], Any],
    config: ReconstructConfig,
    *,
    images_in: Callable[[Any], float] = lambda batch: 1,
    progress: bool = False,
) -> dict:
    """Reconstruct a calibrated (QUANTIZED) model in place; returns what was done (for the report).

    ``chains``: block chains in forward order (an adapter's units: their inputs are captured once and
    propagated); ``heads``: units after them, in forward order, each captured in a forward of the
    model as reconstructed so far (``config.heads='module'``); ``layers``: the quantized layers outside
    the chains, by model path, reconstructed alone unless a head unit contains them (``'none'``:
    neither). ``batches()``: a fresh iterable of calibration inputs on every call (the images are read
    again, once per capture); ``run(model, batch)``: one forward. Model parameters are left untouched
    (their ``requires_grad`` is restored).
    """
    rng = _Rng(config.seed)
    heads = list(heads) if config.heads == 'module' else []
    in_heads = {id(m) for u in heads for m in u.module.modules()}
    layers = (
        {n: m for n, m in layers.items() if _reconstructible(m) and id(m) not in in_heads}
        if config.heads != 'none'
        else {}
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=config.iters * (sum(len(c) for c in chains) + len(heads) + len(layers)),
            desc='reconstruction',
            unit='step',
            leave=False,
        )
    tick = (lambda: bar.update(1)) if bar is not None else (lambda: None)

    def named(name: str) -> None:
        if bar is not None:
            bar.set_description(f'reconstruction {name}')

    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    errors: dict[str, list[float]] = {}
    feed = _Feed(model, batches, run, config.num_images, images_in)
    n_batches, n_images = feed.count()
    per_call = max(1, math.ceil(config.max_rows / n_batches))
    start = time.perf_counter()
    block_seconds = 0.0
    try:
        for chain in chains:
            x_fp, x_q = _capture_inputs(feed, chain[0], per_call, rng)
            for unit in chain:
                named(unit.name)
                x_fp, x_q, errors[unit.name] = _reconstruct_unit(unit, x_fp, x_q, config, rng, tick)
            del x_fp, x_q
        block_seconds = time.perf_counter() - start
        groups: dict[str, dict[str, QuantModule]] = {}
        for name, layer in layers.items():
            groups.setdefault(name.split('.')[0], {})[name] = layer
        # heads and groups of lone layers in module order (the order modules are defined, which is
        # the forward order of detectors): each is captured after everything before it is learned
        order = {id(m): i for i, m in enumerate(model.modules())}
        work = [(order[id(u.module)], u) for u in heads] + [
            (order[id(next(iter(g.values())))], g) for g in groups.values()
        ]
        for _, item in sorted(work, key=lambda w: w[0]):
            if isinstance(item, Unit):
                named(item.name)
                x_fp, x_q = _capture_inputs(feed, item, per_call, rng)
                if x_q:  # else never fed (no detections): left as calibrated
                    errors[item.name] = _reconstruct_unit(item, x_fp, x_q, config, rng, tick)[2]
                del x_fp, x_q
                continue
            rows = _capture_rows(feed, item, per_call, rng)
            for name, layer in item.items():
                named(name)
                if not rows[name].x:  # never fed: left as calibrated
                    continue
                x, valid = _cat_rows(rows.pop(name))
                assert isinstance(layer, (QuantLinear, QuantConv2d))  # (kept by _reconstructible)
                err_before = _layer_error(layer, x, valid, config.batch_rows * 8)
                _learn_layer(layer, x, valid, config, rng, tick)
                errors[name] = [err_before, _layer_error(layer, x, valid, config.batch_rows * 8)]
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        if bar is not None:
            bar.close()
    return {
        'blocks': sum(len(c) for c in chains),
        'heads': len(heads),
        'layers': len(layers),
        'images': n_images,
        'block_seconds': round(block_seconds, 2),
        'head_seconds': round(time.perf_counter() - start - block_seconds, 2),
        'relative_error': errors,
    }


__all__ = ['reconstruct_']
