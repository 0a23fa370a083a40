"""What reconstruction works on, and the data it learns from.

The :class:`Unit` an adapter declares; the inputs a unit receives in forwards of the float and the
quantized model, captured once and batched for learning; sampled input rows of the lone layers
(im2col patches for a convolution); the seeded randomness behind every sample. Nothing here learns:
:mod:`.reconstruct_learning` does.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from .modules import QuantConv2d, QuantLinear, QuantModule, QuantState, set_quant_state


@dataclass
class Unit:
    """A block reconstructed whole. ``forward(*state)`` returns its output (in a chain: the next unit's
    input state, a tuple); a unit's input state is the positional arguments its ``module`` is called
    with (captured in a forward of the model; in a chain, only the first unit's).

    aligned:     its inputs in the float model correspond one to one to those in the quantized model
                 (same images, same shapes), so the target is the float unit on the *float* inputs;
                 otherwise (RoI heads: other proposals) the float unit on the quantized inputs.
    sample_rows: dim 0 of its inputs indexes independent samples (RoIs), of which a random sample is
                 kept (at most ``max_rows``); a call without any is skipped, and a unit never fed is
                 left as calibrated.
    """

    name: str
    module: nn.Module
    forward: Callable[..., Any]
    aligned: bool = True
    sample_rows: bool = False


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


# ------------------------------------------------------------------------------- unit inputs
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


_PreHook = Callable[[nn.Module, tuple[Any, ...]], None]


@dataclass(frozen=True)
class _Feed:
    """The model and the calibration images every capture runs it on: ``batches()`` a fresh iterable
    of batches (the images are read again for each capture), ``run(model, batch)`` one forward, and
    only the first batches up to ``limit`` images (``images_in(batch)`` in a batch) are used."""

    model: nn.Module
    batches: Callable[[], Iterable]
    run: Callable[[nn.Module, Any], Any]
    limit: int
    images_in: Callable[[Any], float]

    def used_batches(self) -> Iterator[Any]:
        """A fresh pass over the calibration batches, stopping once ``limit`` images have been given."""
        done = 0.0
        for batch in self.batches():
            if done >= self.limit:
                return
            yield batch
            done += self.images_in(batch)

    def forward(self, batch: Any) -> None:
        self.run(self.model, batch)

    def count(self) -> tuple[int, float]:
        """(batches, images) reconstruction uses (loads them, runs no forward)."""
        n, done = 0, 0.0
        for batch in self.used_batches():
            n, done = n + 1, done + self.images_in(batch)
        if not n:
            raise ValueError(
                'reconstruction received no calibration batches (the calibration source was empty when read again)'
            )
        return n, done


@contextmanager
def _pre_hooks(hooks: Iterable[tuple[nn.Module, _PreHook]]) -> Iterator[None]:
    """Forward pre-hooks on modules, removed on leaving."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _capture_inputs(feed: _Feed, unit: Unit, rows_per_call: int, rng: _Rng) -> tuple[list[State], list[State]]:
    """The positional inputs ``unit.module`` receives on the used images: in the float and
    the quantized model for an aligned unit, else in the quantized model only (returned twice, the
    same list); a ``sample_rows`` unit keeps ``rows_per_call`` sampled rows of each call."""
    states = (QuantState.FLOAT, QuantState.QUANTIZED) if unit.aligned else (QuantState.QUANTIZED,)
    sinks: dict[QuantState, list[State]] = {s: [] for s in states}
    current: list[State] = []

    def capture(module: nn.Module, args: tuple) -> None:
        args = _detach(args)
        if unit.sample_rows:
            n = args[0].shape[0]
            if n == 0:  # no RoIs on this image
                return
            pick = rng.rows(n, rows_per_call, args[0].device)
            args = tuple(a[pick] if torch.is_tensor(a) and a.shape[:1] == (n,) else a for a in args)
        current.append(args)

    try:
        with _pre_hooks([(unit.module, capture)]), torch.no_grad():
            for batch in feed.used_batches():
                for state, sink in sinks.items():
                    set_quant_state(feed.model, state)
                    current.clear()
                    feed.forward(batch)
                    sink.extend(current)
    finally:
        set_quant_state(feed.model, QuantState.QUANTIZED)
    q = sinks[QuantState.QUANTIZED]
    fp = sinks.get(QuantState.FLOAT, q)
    if len(fp) != len(q) or (not q and not unit.sample_rows):
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


def _capture_rows(feed: _Feed, layers: dict[str, QuantModule], rows_per_call: int, rng: _Rng) -> dict[str, _Rows]:
    """Input rows of ``layers`` in the quantized model, ``rows_per_call`` sampled per call of a layer."""
    rows = {name: _Rows([], []) for name in layers}

    def hook(name: str, layer: QuantModule) -> _PreHook:
        def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            if x.numel() == 0:
                return
            got = (
                _conv_rows(x, layer, rows_per_call, rng)
                if isinstance(layer, QuantConv2d)
                else _linear_rows(x, rows_per_call, rng)
            )
            rows[name].x.append(got[0])
            rows[name].valid.append(got[1])

        return capture

    with _pre_hooks((layer, hook(name, layer)) for name, layer in layers.items()), torch.no_grad():
        for batch in feed.used_batches():
            feed.forward(batch)
    return rows


def _cat_rows(r: _Rows) -> tuple[Tensor, Tensor | None]:
    x = torch.cat(r.x)
    # (one layer's rows: every call gave a conv's tap mask, or none did)
    valid = None if r.valid[0] is None else torch.cat(cast(list[Tensor], r.valid))
    return x, valid
