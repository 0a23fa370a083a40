"""How a unit learns: AdaRound's rounding and LSQ's step sizes, the loss, and the optimisation loops.

The learners of one unit share an Adam optimizer and the β schedule of the rounding regularizer; a
block learns on its captured inputs (QDrop where they are the float model's), a lone layer on its
sampled rows. The loss and the schedule are told in :mod:`.reconstruct`; the data comes from
:mod:`.reconstruct_units`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .modules import QuantConv2d, QuantLinear, QuantModule, QuantState, _Quantizer, set_quant_state
from .reconstruct_config import ReconstructConfig
from .reconstruct_units import State, Unit, _collate, _Rng, _tensors, _zip_map

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches 0 and 1 exactly


# ------------------------------------------------------------------------------- learners
class _Rounding:
    """AdaRound's learned rounding of one layer's weights (``V``, with the layer's weight qparams fixed)."""

    def __init__(self, layer: QuantLinear | QuantConv2d):
        layer.quantized_weight()  # weight qparams of the current (reparameterized) weights
        self.quantizer = layer.weight_quantizer
        with torch.no_grad():
            t = layer.weight.detach().to(self.quantizer.delta.dtype) / self.quantizer.delta
            rest = t - t.floor()
            self.v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)

    def h(self) -> Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def apply(self) -> None:
        self.quantizer.rounding = self.h()

    def regularizer(self, beta: float) -> Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def harden(self) -> None:
        self.quantizer.rounding = (self.v.detach() >= 0).to(torch.uint8)


class _Step:
    """A learned activation step ``Δ = Δ₀·exp(s)`` (log scale: one learning rate for every magnitude)."""

    def __init__(self, quantizer: _Quantizer):
        self.quantizer = quantizer
        self.d0 = quantizer.delta.detach().clone()
        self.s = torch.zeros_like(self.d0).requires_grad_(True)

    def apply(self) -> None:
        self.quantizer.delta = self.d0 * self.s.exp()

    def harden(self) -> None:
        self.quantizer.delta = (self.d0 * self.s.exp()).detach()  # s = 0 gives Δ₀ exactly


class _Learners:
    """The learned quantities of one unit, their optimizer, QDrop hooks and the β schedule."""

    def __init__(self, modules: Sequence[QuantModule], config: ReconstructConfig, rng: _Rng, drop_prob: float):
        self.config = config
        self.drop_prob = drop_prob
        self.roundings = (
            [_Rounding(m) for m in modules if isinstance(m, (QuantLinear, QuantConv2d))]
            if config.weight_rounding
            else []
        )
        self.quantizers = [q for m in modules for q in m.input_quantizers() if q.calibrated]
        self.steps = [_Step(q) for q in self.quantizers] if config.act_step else []
        self.n_weights = sum(r.v.numel() for r in self.roundings)
        groups = [
            {'params': [r.v for r in self.roundings], 'lr': config.lr_rounding},
            {'params': [s.s for s in self.steps], 'lr': config.lr_step},
        ]
        self.optimizer = torch.optim.Adam([g for g in groups if g['params']])
        self.rng = rng
        self.hooks: list = []

    def __enter__(self) -> _Learners:
        if self.drop_prob > 0:
            self.hooks = [q.register_forward_hook(self._drop) for q in self.quantizers]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.hooks:
            h.remove()
        for learner in self.roundings + self.steps:
            learner.harden()

    def _drop(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        return self.rng.mix(args[0].to(out.dtype), out, self.drop_prob)

    def apply(self) -> None:
        for learner in self.roundings + self.steps:
            learner.apply()

    def step(self, rec: Tensor, t: int) -> None:
        c = self.config
        loss = rec
        start = int(c.warmup * c.iters)
        if self.roundings and t >= start and c.round_weight > 0:
            beta = c.beta[1] + (c.beta[0] - c.beta[1]) * max(0.0, 1 - (t - start) / max(1, c.iters - start))
            loss = loss + c.round_weight * sum(r.regularizer(beta) for r in self.roundings) / self.n_weights
        if loss.requires_grad:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


# ------------------------------------------------------------------------------- loss
def _relative_error(outputs: Iterable[tuple[Any, Any]]) -> Tensor:
    """Mean over output tensors (by position) of ``Σ (ŷ - y)² / Σ y²`` over the (quantized, float) pairs:
    each output of a multi-output unit (box scores and deltas, FPN levels) counts alike."""
    num: list[Tensor] = []
    den: list[Tensor] = []
    for got, want in outputs:
        for i, (g, w) in enumerate(zip(_tensors(got), _tensors(want))):
            e, d = (g.float() - w.float()).pow(2).sum(), w.float().pow(2).sum()
            if i < len(num):
                num[i], den[i] = num[i] + e, den[i] + d
            else:
                num.append(e)
                den.append(d)
    return torch.stack([n / d.clamp_min(torch.finfo(torch.float32).tiny) for n, d in zip(num, den)]).mean()


# ------------------------------------------------------------------------------- blocks
def _modules_of(module: nn.Module) -> list[QuantModule]:
    return [m for m in module.modules() if isinstance(m, QuantModule)]


def _run_unit(unit: Unit, states: Sequence[State], state: QuantState) -> list[State]:
    set_quant_state(unit.module, state)
    try:
        with torch.no_grad():
            return [unit.forward(*s) for s in states]
    finally:
        set_quant_state(unit.module, QuantState.QUANTIZED)


def _learn_block(
    unit: Unit,
    x_fp: list[State],
    x_q: list[State],
    y_fp: list[State],
    config: ReconstructConfig,
    rng: _Rng,
    tick: Callable[[], None],
) -> None:
    # QDrop where the unit learns from the float model's inputs (asymmetric); on its own quantized
    # inputs dropping quantization only blurs the objective (measured: higher error)
    drop = config.drop_prob if x_fp is not x_q else 0.0
    learners = _Learners(_modules_of(unit.module), config, rng, drop)
    if not (learners.roundings or learners.steps):
        return
    mix = lambda f, q: rng.mix(f, q, drop)  # noqa: E731
    with learners, torch.enable_grad():
        for t in range(config.iters):
            chosen = rng.choose(len(x_q), config.batch_size)
            inputs = _collate(x_q, chosen)
            if drop > 0:  # QDrop at the block input as inside it
                inputs = [_zip_map(mix, q, f) for q, f in zip(inputs, _collate(x_fp, chosen))]
            learners.apply()
            rec = _relative_error((unit.forward(*s), y) for s, y in zip(inputs, _collate(y_fp, chosen)))
            learners.step(rec, t)
            tick()


def _reconstruct_unit(
    unit: Unit, x_fp: list[State], x_q: list[State], config: ReconstructConfig, rng: _Rng, tick: Callable[[], None]
) -> tuple[list[State], list[State], list[float]]:
    """Learn one unit; returns its float and quantized outputs (the next unit's inputs) and its
    relative output error before and after. ``x_q`` is consumed: replaced sample by sample."""
    y_fp = _run_unit(unit, x_fp, QuantState.FLOAT)
    err_before = float(_relative_error(zip(_run_unit(unit, x_q, QuantState.QUANTIZED), y_fp)))
    _learn_block(unit, x_fp, x_q, y_fp, config, rng, tick)
    for i, s in enumerate(x_q):  # in place: one sample's output at a time
        x_q[i] = _run_unit(unit, [s], QuantState.QUANTIZED)[0]
    return y_fp, x_q, [err_before, float(_relative_error(zip(x_q, y_fp)))]


# ------------------------------------------------------------------------------- layers
def _layer_output(layer: QuantLinear | QuantConv2d, x: Tensor, valid: Tensor | None, quantized: bool) -> Tensor:
    """The layer on its rows: ``x Wᵀ + b`` in float, or with its input and weight fake-quantized."""
    weight = layer.quantized_weight() if quantized else layer.weight
    if quantized:
        x = layer.input_quantizer(x)
        if valid is not None:  # padding taps are zeros after quantization, as in the conv
            x = x * valid.repeat(1, x.shape[1] // valid.shape[1])  # patch columns are (channel, tap)
    out = x @ weight.reshape(weight.shape[0], -1).t()
    return out if layer.bias is None else out + layer.bias


def _layer_error(layer: QuantLinear | QuantConv2d, x: Tensor, valid: Tensor | None, chunk: int) -> float:
    """Relative output error of the quantized layer on all its rows (in chunks)."""

    def pairs():
        for i in range(0, x.shape[0], chunk):
            rows, taps = x[i : i + chunk], None if valid is None else valid[i : i + chunk]
            yield (_layer_output(layer, rows, taps, True),), (_layer_output(layer, rows, None, False),)

    with torch.no_grad():
        return float(_relative_error(pairs()))


def _learn_layer(
    layer: QuantLinear | QuantConv2d,
    x: Tensor,
    valid: Tensor | None,
    config: ReconstructConfig,
    rng: _Rng,
    tick: Callable[[], None],
) -> None:
    learners = _Learners([layer], config, rng, 0.0)
    with torch.no_grad():
        target = _layer_output(layer, x, None, False)
    with learners, torch.enable_grad():
        for t in range(config.iters):
            pick = rng.rows(x.shape[0], config.batch_rows, x.device)
            learners.apply()
            got = _layer_output(layer, x[pick], None if valid is None else valid[pick], True)
            learners.step(_relative_error([((got,), (target[pick],))]), t)
            tick()
