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
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from .modules import QuantConv2d, QuantLinear, QuantModule, QuantState, _Quantizer, set_quant_state
from .options import from_options

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches 0 and 1 exactly
HEAD_MODES = ('module', 'layer', 'none')


@dataclass(frozen=True)
class ReconstructConfig:
    """How reconstruction runs (see the module docstring for the loss).

    iters:          optimizer steps per unit (block or layer).
    batch_size:     calibration samples (images, or calibration batches) per step of a block.
    num_images:     at most this many calibration images are used (the first ones): bounds the cached
                    block inputs (three copies of one block's inputs per image).
    weight_rounding, act_step: learn the weights' rounding / the activation step sizes.
    lr_rounding, lr_step: Adam learning rates of ``V`` and of ``log Δ``.
    round_weight:   λ, weight of the rounding regularizer.
    warmup:         fraction of the steps without the regularizer.
    beta:           (start, end) of β's linear annealing.
    drop_prob:      QDrop: probability that an activation keeps its float value while a unit learns from
                    the float model's inputs (blocks, and with ``heads='module'`` the neck and RPN
                    head; 0 = BRECQ). Units learning on their own quantized inputs (RoI heads, lone
                    layers) never drop.
    heads:          the quantized layers outside the backbone's blocks (scope ``'detector'``):
                    ``'module'``: the neck, the RPN head and every RoI box / mask head whole (what an
                    mmdet detector has of them), any other layer alone; ``'layer'``: every layer alone;
                    ``'none'``: left as calibrated.
    max_rows:       RoIs kept per RoI head, and input rows (tokens, RoIs, conv patches) per lone layer.
    batch_rows:     rows per step of a lone layer.
    seed:           of every random choice.
    """

    iters: int = 300
    batch_size: int = 4
    num_images: int = 32
    weight_rounding: bool = True
    act_step: bool = True
    lr_rounding: float = 3e-2
    lr_step: float = 1e-3
    round_weight: float = 10.0
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    drop_prob: float = 0.5
    heads: str = 'module'
    max_rows: int = 4096
    batch_rows: int = 512
    seed: int = 0

    def __post_init__(self):
        for name in ('iters', 'batch_size', 'num_images', 'max_rows', 'batch_rows', 'seed'):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == 'seed' else 1):
                raise ValueError(
                    f'reconstruct.{name} must be a {"non-negative" if name == "seed" else "positive"} '
                    f'integer, got {v!r}'
                )
        for name in ('lr_rounding', 'lr_step', 'round_weight'):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f'reconstruct.{name} must be a finite number >= 0, got {v!r}')
        if not 0 <= self.warmup < 1:
            raise ValueError(f'reconstruct.warmup must be in [0, 1), got {self.warmup!r}')
        if not 0 <= self.drop_prob < 1:
            raise ValueError(f'reconstruct.drop_prob must be in [0, 1), got {self.drop_prob!r}')
        beta = tuple(self.beta)
        if len(beta) != 2 or not all(isinstance(b, (int, float)) and b > 0 for b in beta):
            raise ValueError(f'reconstruct.beta must be two positive numbers (start, end), got {self.beta!r}')
        object.__setattr__(self, 'beta', (float(beta[0]), float(beta[1])))
        if self.heads not in HEAD_MODES:
            raise ValueError(f'reconstruct.heads must be one of {HEAD_MODES}, got {self.heads!r}')
        if not (self.weight_rounding or self.act_step):
            raise ValueError('reconstruct: nothing to learn (weight_rounding and act_step are both False)')

    @classmethod
    def from_options(cls, options: dict) -> ReconstructConfig:
        return from_options(cls, options, 'reconstruct')

    def describe(self) -> dict:
        out = asdict(self)
        out['beta'] = list(self.beta)
        return out


@dataclass
class Unit:
    """A block reconstructed whole. ``forward(*state)`` returns its output (in a chain: the next unit's
    input state, a tuple); a unit's input state is the positional arguments its ``module`` is called
    with (captured in a forward of the model; in a chain, only the first unit's).

    aligned: its inputs in the float model correspond one to one to those in the quantized model (same
             images, same shapes), so the target is the float unit on the *float* inputs; otherwise
             (RoI heads: other proposals) the float unit on the quantized inputs.
    rows:    its inputs are independent samples along dim 0 (RoIs): at most ``max_rows`` are kept.
    """

    name: str
    module: nn.Module
    forward: Callable[..., Any]
    aligned: bool = True
    rows: bool = False


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


class _Rng:
    """Seeded randomness: batch choices on the host, masks and row samples on the tensors' device."""

    def __init__(self, seed: int):
        self.seed = seed
        self.host = random.Random(seed)
        self._device: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._device:
            self._device[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._device[device]

    def mix(self, keep: Tensor, other: Tensor, p: float) -> Tensor:
        """Per element ``keep`` with probability ``p``, else ``other`` (lerp with a 0/1 weight is exact
        and, on CPU, several times faster than torch.where)."""
        mask = torch.rand(other.shape, generator=self.generator(other.device), device=other.device) < p
        return torch.lerp(other, keep, mask.to(other.dtype))

    def choose(self, n: int, k: int) -> list[int]:
        return sorted(self.host.sample(range(n), min(k, n)))

    def rows(self, n: int, k: int, device: torch.device) -> Tensor:
        return torch.randperm(n, generator=self.generator(device), device=device)[:k]


# ------------------------------------------------------------------------------- blocks
State = tuple  # a unit's positional inputs (tensors, possibly nested in tuples/lists, and plain values)


def _tensors(v: Any) -> list[Tensor]:
    if torch.is_tensor(v):
        return [v] if v.is_floating_point() else []
    if isinstance(v, (tuple, list)):
        return [t for item in v for t in _tensors(item)]
    return []


def _signature(v: Any) -> Any:
    if torch.is_tensor(v):
        return ('tensor', tuple(v.shape[1:]), v.dtype)
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_signature(item) for item in v))
    return v


def _stack(values: Sequence[Any]) -> Any:
    """Samples of one structure as one batch: tensors concatenated along dim 0, the rest from the first."""
    first = values[0]
    if torch.is_tensor(first):
        return torch.cat(list(values)) if len(values) > 1 else first
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([v[i] for v in values]) for i in range(len(first)))
    return first


def _zip_map(fn: Callable[[Tensor, Tensor], Tensor], a: Any, b: Any) -> Any:
    """``fn`` on the float tensors of two states of one structure, in place of ``a``'s."""
    if torch.is_tensor(a):
        return fn(a, b) if a.is_floating_point() else a
    if isinstance(a, (tuple, list)):
        return type(a)(_zip_map(fn, x, y) for x, y in zip(a, b))
    return a


def _detach(v: Any) -> Any:
    if torch.is_tensor(v):
        return v.detach()
    if isinstance(v, (tuple, list)):
        return type(v)(_detach(item) for item in v)
    return v


def _collate(states: Sequence[State], indices: Sequence[int]) -> list[State]:
    """The chosen samples as few batched states: samples whose shapes agree are concatenated."""
    groups: dict[Any, list[State]] = {}
    for i in indices:
        groups.setdefault(_signature(states[i]), []).append(states[i])
    return [_stack(group) for group in groups.values()]


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


def _first_images(batches: Callable[[], Iterable], limit: int, images_in: Callable[[Any], float]) -> Iterable:
    """A fresh pass over the calibration batches, stopping once ``limit`` images have been given."""
    done = 0.0
    for batch in batches():
        if done >= limit:
            return
        yield batch
        done += images_in(batch)


def _capture_inputs(
    model: nn.Module,
    unit: Unit,
    batches: Callable[[], Iterable],
    run: Callable[[nn.Module, Any], Any],
    limit: int,
    images_in: Callable[[Any], float],
    rows_per_call: int,
    rng: _Rng,
) -> tuple[list[State], list[State]]:
    """The positional inputs ``unit.module`` receives on the first ``limit`` images: in the float and
    the quantized model for an aligned unit, else in the quantized model only (returned twice, the
    same list); a ``rows`` unit keeps ``rows_per_call`` sampled rows of each call."""
    states = (QuantState.FLOAT, QuantState.QUANTIZED) if unit.aligned else (QuantState.QUANTIZED,)
    sinks: dict[QuantState, list[State]] = {s: [] for s in states}
    current: list[State] = []

    def capture(module: nn.Module, args: tuple) -> None:
        args = _detach(args)
        if unit.rows:
            n = args[0].shape[0]
            if n == 0:  # no RoIs on this image
                return
            pick = rng.rows(n, rows_per_call, args[0].device)
            args = tuple(a[pick] if torch.is_tensor(a) and a.shape[:1] == (n,) else a for a in args)
        current.append(args)

    handle = unit.module.register_forward_pre_hook(capture)
    try:
        with torch.no_grad():
            for batch in _first_images(batches, limit, images_in):
                for state, sink in sinks.items():
                    set_quant_state(model, state)
                    current.clear()
                    run(model, batch)
                    sink.extend(current)
    finally:
        handle.remove()
        set_quant_state(model, QuantState.QUANTIZED)
    q = sinks[QuantState.QUANTIZED]
    fp = sinks.get(QuantState.FLOAT, q)
    if len(fp) != len(q) or (not q and not unit.rows):
        raise RuntimeError(
            f'reconstruction: {unit.name} received {len(q)} quantized / {len(fp)} float inputs on '
            f'the calibration images; it needs the same non-zero number'
        )
    return fp, q


# ------------------------------------------------------------------------------- layers
@dataclass
class _Rows:
    """Sampled input rows of one layer: ``x`` [R, in·k·k]; ``valid`` [R, k·k] (conv padding) or None."""

    x: list[Tensor]
    valid: list[Tensor | None]


def _linear_rows(x: Tensor, k: int, rng: _Rng) -> tuple[Tensor, None]:
    rows = x.reshape(-1, x.shape[-1])
    return rows[rng.rows(rows.shape[0], k, x.device)], None


def _conv_rows(x: Tensor, conv: nn.Conv2d, k: int, rng: _Rng) -> tuple[Tensor, Tensor]:
    """``k`` sampled im2col patches of ``x`` (only those are gathered) and which taps are inside the image."""
    b, c, h, w = x.shape
    assert not isinstance(conv.padding, str)  # (not reconstructible: see _reconstructible)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    pick = rng.rows(b * oh * ow, k, x.device)
    n, rest = pick // (oh * ow), pick % (oh * ow)
    taps_h = torch.arange(kh, device=x.device).repeat_interleave(kw) * dh
    taps_w = torch.arange(kw, device=x.device).repeat(kh) * dw
    hi = (rest // ow * sh)[:, None] + taps_h[None] - ph  # [R, k·k] input rows
    wi = (rest % ow * sw)[:, None] + taps_w[None] - pw
    valid = (hi >= 0) & (hi < h) & (wi >= 0) & (wi < w)
    patches = x[n[:, None], :, hi.clamp(0, h - 1), wi.clamp(0, w - 1)]  # [R, k·k, C]
    patches = patches * valid[..., None]
    return patches.permute(0, 2, 1).reshape(len(pick), c * kh * kw), valid


def _reconstructible(layer: QuantModule) -> bool:
    """Layers whose product is ``rows @ Wᵀ`` with a per-tensor input (after reparameterization, all
    are per tensor): Linear, and ungrouped zero-padded convolutions via their im2col patches."""
    if isinstance(layer, QuantConv2d):
        return (
            layer.groups == 1
            and layer.padding_mode == 'zeros'
            and not isinstance(layer.padding, str)
            and layer.input_quantizer.channel_axis is None
        )
    return isinstance(layer, QuantLinear)


def _capture_rows(
    model: nn.Module,
    layers: dict[str, QuantModule],
    batches: Callable[[], Iterable],
    run: Callable[[nn.Module, Any], Any],
    limit: int,
    images_in: Callable[[Any], float],
    per_call: int,
    rng: _Rng,
) -> dict[str, _Rows]:
    """Input rows of ``layers`` in the quantized model, ``per_call`` sampled per call of a layer."""
    rows = {name: _Rows([], []) for name in layers}

    def hook(name: str, layer: QuantModule) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            if x.numel() == 0:
                return
            got = (
                _conv_rows(x, layer, per_call, rng)
                if isinstance(layer, QuantConv2d)
                else _linear_rows(x, per_call, rng)
            )
            rows[name].x.append(got[0])
            rows[name].valid.append(got[1])

        return capture

    handles = [layer.register_forward_pre_hook(hook(name, layer)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for batch in _first_images(batches, limit, images_in):
                run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return rows


def _layer_output(layer: QuantLinear | QuantConv2d, x: Tensor, valid: Tensor | None, quantized: bool) -> Tensor:
    """The layer on its rows: ``x Wᵀ + b`` in float, or with its input and weight fake-quantized."""
    weight = layer.quantized_weight() if quantized else layer.weight
    if quantized:
        x = layer.input_quantizer(x)
        if valid is not None:  # padding taps are zeros after quantization, as in the conv
            x = x * valid.repeat(1, x.shape[1] // valid.shape[1])  # patch columns are (channel, tap)
    out = x @ weight.reshape(weight.shape[0], -1).t()
    return out if layer.bias is None else out + layer.bias


def _cat_rows(r: _Rows) -> tuple[Tensor, Tensor | None]:
    x = torch.cat(r.x)
    # (one layer's rows: every call gave a conv's tap mask, or none did)
    valid = None if r.valid[0] is None else torch.cat(cast(list[Tensor], r.valid))
    return x, valid


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


# ------------------------------------------------------------------------------- driver
def _count(batches: Callable[[], Iterable], limit: int, images_in: Callable[[Any], float]) -> tuple[int, float]:
    """(batches, images) reconstruction uses: the first batches up to ``limit`` images (loads, no forward)."""
    n, done = 0, 0.0
    for batch in _first_images(batches, limit, images_in):
        n, done = n + 1, done + images_in(batch)
    if not n:
        raise ValueError(
            'reconstruction received no calibration batches (the calibration source was empty when read again)'
        )
    return n, done


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
    n_batches, n_images = _count(batches, config.num_images, images_in)
    per_call = max(1, math.ceil(config.max_rows / n_batches))
    start = time.perf_counter()
    block_seconds = 0.0
    try:
        for chain in chains:
            x_fp, x_q = _capture_inputs(model, chain[0], batches, run, config.num_images, images_in, per_call, rng)
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
                x_fp, x_q = _capture_inputs(model, item, batches, run, config.num_images, images_in, per_call, rng)
                if x_q:  # else never fed (no detections): left as calibrated
                    errors[item.name] = _reconstruct_unit(item, x_fp, x_q, config, rng, tick)[2]
                del x_fp, x_q
                continue
            rows = _capture_rows(model, item, batches, run, config.num_images, images_in, per_call, rng)
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


__all__ = ['ReconstructConfig', 'Unit', 'reconstruct_', 'HEAD_MODES']
