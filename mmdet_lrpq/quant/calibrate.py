"""Calibration driver: RepQ-ViT's protocol per calibration forward, streamed over any number of them.

Within one forward (one batch of images), RepQ-ViT's protocol holds: each activation quantizer
fixes its parameters from the first non-empty input it sees and quantizes that very input, so
later layers are calibrated on the quantized outputs of earlier ones; weights are quantized from
the start. Several images in one batch are calibrated on together, but memory then grows with
the batch.

So calibration *streams*: the images go through one batch at a time (any batch size), each
batch calibrates every quantizer afresh by that rule, and the parameters are combined across
batches by the **envelope of the batch ranges**: a uniform quantizer's clipping range
``[-zp·Δ, (2^b-1-zp)·Δ]`` (per channel where it is per channel) becomes the smallest range holding
every batch's, ``[min_b lo_b, max_b hi_b]``, with ``Δ, zp`` re-derived from it
(``Δ = (hi-lo)/(2^b-1)``, ``zp = round(-lo/Δ)``); a log-√2 quantizer's ``Δ`` (its largest level)
is the largest batch ``Δ``; a region-wise (OPT-m) quantizer takes the envelope of its regions' ends
with the smallest batch ratio exponent ``m`` and re-derives ``Δ, zp`` on the range stretched by
``2^m`` (as it calibrates). Peak memory is one batch's forward plus a few numbers per quantizer,
whatever the number of images. With one batch (one image, RepQ-ViT's COCO protocol, or all images
as one batch) the parameters are that batch's, bit for bit. A quantizer that receives no input in
some batch (no RoIs on that image) is combined over the batches that fed it; one that no batch fed
is an error. Deterministic: no sampling anywhere.

Why the envelope and not the mean of the batch ranges (an earlier rule): one batch of N
images calibrates on the union of their activations, and where an image holds few values per
channel (the last Swin stage at 224 px: 49 tokens) RepQ's percentiles are the extremes, of the
image alone or of all N together. There, post-LayerNorm channels move *between* images far more
than within one (miniature-world classifier, last stage after its first attention: the spread of
the per-image channel means is 4-5x the spread inside an image, the range over 32 images 4-5x an
image's own), so a mean of per-image ranges is the range of a typical image and clips every other:
streamed one image at a time, that classifier fell from 68 % to 42 % top-1 at W8A8 (one batch of
32: 67 %; with the envelope: 67 %). Where a batch holds many values its percentile range already
leaves out outliers, and one batch's range lies between the mean and the envelope (tiny Mask
R-CNN, 4 images: narrower than the envelope for 80 of 86 quantizers, wider than the mean for 77):
the envelope errs on the side of covering every calibration image. (Envelope only where a batch's
percentiles are its extremes, mean elsewhere, was tried: the classifier still lost 4 points at
4 images.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .modules import (
    LogSqrt2Quantizer,
    QuantState,
    RegionUniformQuantizer,
    UniformQuantizer,
    _Quantizer,
    quant_modules,
    set_quant_state,
)

T = TypeVar('T')
RULE = 'envelope of per-batch RepQ ranges'


class _RangeEnvelope:
    """Running envelope of one activation quantizer's per-batch ranges (see module docstring)."""

    def __init__(self) -> None:
        self.first: tuple[Tensor, ...] | None = None
        self.bounds: list[Tensor] | None = None  # uniform: [lo, hi]; log-sqrt2: [delta]
        self.batches = 0
        self.values = 0  # per channel, over all batches

    @staticmethod
    def _ranges(q: _Quantizer) -> list[Tensor]:
        if isinstance(q, UniformQuantizer):
            delta, zp = q.delta.double(), q.zero_point.double()
            lo = -zp * delta
            return [lo, lo + ((1 << q.bits) - 1) * delta]
        if isinstance(q, RegionUniformQuantizer):  # [lo, hi, m]: the regions' ends and the ratio
            delta, zp, m = q.delta.double(), q.zero_point.double(), q.ratio_exp.double()
            return [-zp * delta * torch.exp2(-m), (((1 << q.bits) - 1) - zp) * delta, m]
        return [q.delta.double()]

    def add(self, q: _Quantizer) -> None:
        ranges = self._ranges(q)
        if self.batches == 0:
            self.first = tuple(getattr(q, n).clone() for n in q._qparam_names)
            self.bounds = ranges
        elif isinstance(q, UniformQuantizer):
            assert self.bounds is not None  # (set by the first batch)
            self.bounds = [torch.minimum(self.bounds[0], ranges[0]), torch.maximum(self.bounds[1], ranges[1])]
        elif isinstance(q, RegionUniformQuantizer):
            assert self.bounds is not None
            self.bounds = [
                torch.minimum(self.bounds[0], ranges[0]),
                torch.maximum(self.bounds[1], ranges[1]),
                torch.minimum(self.bounds[2], ranges[2]),
            ]
        else:
            assert self.bounds is not None
            self.bounds = [torch.maximum(self.bounds[0], ranges[0])]
        self.batches += 1
        self.values += getattr(q, 'calib_values', 0)

    def apply(self, q: _Quantizer) -> None:
        """Give ``q`` the combined parameters (nothing if no batch fed it)."""
        if self.batches == 0:
            return
        assert self.first is not None and self.bounds is not None  # (set by the first batch)
        q.calib_values = self.values
        if self.batches == 1:  # exactly that batch's parameters (RepQ-ViT's protocol)
            for name, value in zip(q._qparam_names, self.first):
                setattr(q, name, value)
            return
        dtype = self.first[0].dtype
        if isinstance(q, UniformQuantizer):
            lo, hi = self.bounds
            delta = ((hi - lo) / ((1 << q.bits) - 1)).to(dtype)
            q.set_qparams(delta, (-lo / delta.double()).round().to(dtype), q.channel_axis)
        elif isinstance(q, LogSqrt2Quantizer):
            q.delta = self.bounds[0].to(dtype)
        elif isinstance(q, RegionUniformQuantizer):
            lo, hi, m = self.bounds
            stretched = torch.where(lo < 0, lo * torch.exp2(m), lo)
            delta = ((hi - stretched) / ((1 << q.bits) - 1)).to(dtype)
            q.delta, q.zero_point = delta, (-stretched / delta.double()).round().to(dtype)
            q.ratio_exp = m.to(dtype)
        else:
            raise TypeError(f'no combination rule for {type(q).__name__}')


def activation_quantizers(model: nn.Module) -> list[_Quantizer]:
    return [q for m in quant_modules(model).values() for q in m.input_quantizers()]


def calibrate_stream(
    model: nn.Module,
    batches: Iterable[T],
    run: Callable[[nn.Module, T], Any],
    *,
    images_in: Callable[[T], float] = lambda batch: 1,
    progress: Callable[[float], None] | None = None,
) -> float:
    """Calibrate every quantized module of ``model`` on ``batches`` (see module docstring).

    ``run(model, batch)`` performs one calibration forward; ``images_in(batch)`` is its number of
    images (counted and reported; the envelope does not weight batches); ``progress`` is called
    with the images done.
    Returns the number of images. On success every module is QUANTIZED; on any failure FLOAT.
    """
    quantizers = activation_quantizers(model)
    if not quantizers:
        raise ValueError('the model has no quantized modules to calibrate; wrap it first')
    envelopes = [_RangeEnvelope() for _ in quantizers]
    done = 0.0
    set_quant_state(model, QuantState.CALIBRATING)
    try:
        with torch.no_grad():
            for batch in batches:
                for q in quantizers:
                    q.reset()
                run(model, batch)
                weight = images_in(batch)
                for q, envelope in zip(quantizers, envelopes):
                    if q.calibrated:
                        envelope.add(q)
                done += weight
                if progress is not None:
                    progress(done)
        if not done:
            raise ValueError('calibration received no batches: give at least one calibration input')
        for q, envelope in zip(quantizers, envelopes):
            q.reset()
            envelope.apply(q)
        set_quant_state(model, QuantState.QUANTIZED)  # raises, naming them, if a layer was never fed
    except BaseException:
        set_quant_state(model, QuantState.FLOAT)  # never leave a half-calibrated model behind
        raise
    return done


@contextmanager
def calibrating(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: every quantized module calibrates on its first non-empty input. On exit: QUANTIZED.

    One calibration forward by hand (what :func:`calibrate_stream` does per batch). Raises
    (listing them) if some quantized layers never received input; on any failure every module is
    back in FLOAT.
    """
    if not quant_modules(model):
        raise ValueError('the model has no quantized modules to calibrate; wrap it first')
    set_quant_state(model, QuantState.CALIBRATING)
    try:
        yield model
        set_quant_state(model, QuantState.QUANTIZED)
    except BaseException:
        set_quant_state(model, QuantState.FLOAT)
        raise


def calibrate(model: nn.Module, forward: Callable[[nn.Module], Any]) -> Any:
    """Run ``forward(model)`` once as the only calibration batch; return its output."""
    out: list = []
    calibrate_stream(model, [None], lambda m, _: out.append(forward(m)))
    return out[0]


def thin_channel_ranges(model: nn.Module, min_values: int) -> list[tuple[str, int]]:
    """(module name, values per channel) of every per-channel activation quantizer whose calibrated
    ranges rest on fewer than ``min_values`` values per channel, over all calibration batches."""
    thin = []
    for name, m in quant_modules(model).items():
        for q in m.input_quantizers():
            values = getattr(q, 'calib_values', None)
            if getattr(q, 'channel_axis', None) is not None and values is not None and values < min_values:
                thin.append((name, values))
    return thin
