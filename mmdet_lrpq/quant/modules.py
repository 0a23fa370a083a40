"""Fake-quant modules: quantizers, and Linear / Conv2d / MatMul with explicit quantization states.

Every quantized module moves through ``FLOAT -> CALIBRATING -> QUANTIZED``:

* ``FLOAT``: exactly the float module (same kernels, bit-identical output);
* ``CALIBRATING``: the first non-empty input fixes each activation quantizer (RepQ-ViT's
  protocol: calibrate and quantize in the same forward, so later layers see quantized inputs);
* ``QUANTIZED``: inputs and weights are fake-quantized; an uncalibrated quantizer is an error,
  never a silent float pass-through.

Weights are quantized once and cached. Weight quantization is a pure function of the weights,
so the cache is keyed on the weight tensor's identity and version: any change (for instance by
scale reparameterization) recalibrates and requantizes on the next forward.
Bit-widths come from the caller (a bit plan), never from globals.

Without autograd, a quantized activation is written into a reused per-thread scratch buffer
(one per operand slot) instead of fresh memory: it only lives until the layer's own Linear/conv/
matmul has consumed it, and large fresh allocations cost page faults on every forward. A quantizer
with forward hooks (which might keep its output) always gets fresh memory.
"""

from __future__ import annotations

import enum
import threading
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import (
    check_bits,
    fake_quant_log_sqrt2,
    fake_quant_regions,
    fake_quant_uniform,
    fake_quant_uniform_rounded,
    log_sqrt2_qparams,
    region_qparams,
    uniform_qparams,
)


class _Scratch(threading.local):
    """Per-thread reusable float32 buffers for quantized activations, one per operand slot."""

    def __init__(self) -> None:
        self.buffers: dict[int, Tensor] = {}

    def get(self, slot: int, numel: int) -> Tensor:
        buf = self.buffers.get(slot)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[slot] = torch.empty(numel, device='cpu')  # the fused kernels' CPU float32 path
        return buf


_SCRATCH = _Scratch()


def release_scratch() -> None:
    """Free this thread's activation scratch buffers (they are re-created on the next forward)."""
    _SCRATCH.buffers.clear()


class QuantState(enum.Enum):
    FLOAT = 'float'
    CALIBRATING = 'calibrating'
    QUANTIZED = 'quantized'


class _Quantizer(nn.Module):
    """Base: qparams are buffers that start as ``None`` and can be loaded at any shape.

    ``_learned_names``: optional buffers that only reconstruction sets (``None`` otherwise); saved,
    loaded and reset like the qparams.
    """

    _qparam_names: tuple[str, ...] = ()
    _learned_names: tuple[str, ...] = ()
    delta: Tensor  # every quantizer's step (a buffer: None until calibrated)
    calib_values: int  # values per channel calibrated on (set by calibration where known; not saved)

    if TYPE_CHECKING:

        def calibrate(self, x: Tensor) -> None: ...  # every subclass's: fix the qparams on ``x``

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits)
        for name in self._qparam_names + self._learned_names:
            self.register_buffer(name, None)

    @property
    def calibrated(self) -> bool:
        return all(getattr(self, n) is not None for n in self._qparam_names)

    def reset(self, bits: int | None = None) -> None:
        """Forget the qparams (and optionally change the bit-width)."""
        if bits is not None:
            self.bits = check_bits(bits)
        for name in self._qparam_names + self._learned_names:
            setattr(self, name, None)

    def get_extra_state(self) -> dict:
        return {'bits': self.bits}

    def _follow(self, x: Tensor) -> None:
        """Keep the qparams on the input's device (a state loaded on the CPU into a CUDA model)."""
        first = getattr(self, self._qparam_names[0])
        if first.device != x.device:
            for name in self._qparam_names + self._learned_names:
                if getattr(self, name) is not None:
                    setattr(self, name, getattr(self, name).to(x.device))

    def set_extra_state(self, state: dict) -> None:
        self.bits = check_bits(state['bits'])

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Buffers that are still None are invisible to nn.Module's loader: give them the saved
        # tensor's shape first, then let the normal loader copy (and check) the values.
        for name in self._qparam_names + self._learned_names:
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class UniformQuantizer(_Quantizer):
    """Asymmetric uniform fake quantizer, per tensor or per channel (``channel_axis``).

    ``rounding`` (weights, set by reconstruction only): per element 0 or 1, the learned choice of
    rounding down or up (AdaRound) instead of rounding to nearest; see
    :func:`~.functional.fake_quant_uniform_rounded`.
    """

    _qparam_names = ('delta', 'zero_point')
    _learned_names = ('rounding',)
    rounding: Tensor | None  # (a buffer: registered by _Quantizer)

    def __init__(self, bits: int = 8, channel_axis: int | None = None):
        super().__init__(bits)
        self.channel_axis = channel_axis

    def calibrate(self, x: Tensor) -> None:
        self.delta, self.zero_point = uniform_qparams(x, self.bits, self.channel_axis)
        # How many values each channel's range rests on (not saved): calibration warns where few.
        self.calib_values = x.numel() // (1 if self.channel_axis is None else x.shape[self.channel_axis])

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), 'channel_axis': self.channel_axis}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self.channel_axis = state['channel_axis']

    def set_qparams(self, delta: Tensor, zero_point: Tensor, channel_axis: int | None = None) -> None:
        self.delta, self.zero_point, self.channel_axis = delta, zero_point, channel_axis

    def forward(self, x: Tensor, scratch: Tensor | None = None) -> Tensor:
        self._follow(x)
        if self.rounding is not None:
            return fake_quant_uniform_rounded(x, self.delta, self.zero_point, self.bits, self.rounding)
        return fake_quant_uniform(x, self.delta, self.zero_point, self.bits, scratch)

    @property
    def granularity(self) -> str:
        return 'tensor' if self.channel_axis is None else 'channel'

    def extra_repr(self) -> str:
        return f'bits={self.bits}, granularity={self.granularity}, calibrated={self.calibrated}'


class LogSqrt2Quantizer(_Quantizer):
    """RepQ-ViT's log-√2 quantizer for post-softmax attention (per tensor)."""

    _qparam_names = ('delta',)
    granularity = 'tensor'

    def calibrate(self, x: Tensor) -> None:
        self.delta = log_sqrt2_qparams(x, self.bits)

    def forward(self, x: Tensor, scratch: Tensor | None = None) -> Tensor:
        self._follow(x)
        return fake_quant_log_sqrt2(x, self.delta, self.bits, scratch)

    def extra_repr(self) -> str:
        return f'bits={self.bits}, log-sqrt2, calibrated={self.calibrated}'


class RegionUniformQuantizer(_Quantizer):
    """MPTQ-ViT's OPT-m for post-GELU inputs (per tensor): the uniform quantizer's ``b``-bit codes,
    split at the zero point into a non-negative region with step ``delta`` and a negative region with
    step ``delta·2^-ratio_exp``, the ratio searched on the data (:func:`~.functional.region_qparams`).
    GELU's negative tail is short (>= -0.17) and its positive part long: one step size gives the
    tail only a level or two."""

    _qparam_names = ('delta', 'zero_point', 'ratio_exp')
    granularity = 'regions'

    def calibrate(self, x: Tensor) -> None:
        self.delta, self.zero_point, self.ratio_exp = region_qparams(x, self.bits)

    def forward(self, x: Tensor, scratch: Tensor | None = None) -> Tensor:  # scratch: not used
        self._follow(x)
        return fake_quant_regions(x, self.delta, self.zero_point, self.ratio_exp, self.bits)

    def extra_repr(self) -> str:
        return f'bits={self.bits}, regions (opt-m), calibrated={self.calibrated}'


class QuantModule(nn.Module):
    """Mixin state machine shared by the quantized Linear, Conv2d and MatMul."""

    state: QuantState = QuantState.FLOAT

    def input_quantizers(self) -> list[_Quantizer]:
        raise NotImplementedError

    def _quantize_input(self, quantizer: _Quantizer, x: Tensor, slot: int = 0) -> Tensor:
        """The fake-quantized input; consumed by this module's own op before the slot is reused."""
        if self.state is QuantState.CALIBRATING and not quantizer.calibrated:
            if x.numel() == 0:  # nothing to learn from (e.g. no RoIs): stay uncalibrated
                return x
            quantizer.calibrate(x)
        elif not quantizer.calibrated:
            raise RuntimeError(
                f'{type(self).__name__} is in state {self.state.value} but its input '
                f'quantizer was never calibrated; run calibration first'
            )
        if (
            not torch.is_grad_enabled()
            and x.device.type == 'cpu'
            and x.dtype == torch.float32
            and not quantizer._forward_hooks
            and not quantizer._forward_pre_hooks
        ):
            return quantizer(x, _SCRATCH.get(slot, x.numel()))
        return quantizer(x)

    @property
    def calibrated(self) -> bool:
        return all(q.calibrated for q in self.input_quantizers())


class WeightCache:
    """A weight's fake-quantized copy, recomputed only when the weight, its bit-width or its learned
    rounding changed (the weight quantizer is calibrated on the weight then); while reconstruction
    learns the rounding, computed afresh and differentiably. One per quantized weight."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.key: Any = None
        self.value: Tensor | None = None

    def __call__(self, quantizer: UniformQuantizer, w: Tensor) -> Tensor:
        rounding = quantizer.rounding
        if rounding is not None and rounding.requires_grad:
            return quantizer(w.detach())
        key = (
            w.data_ptr(),
            w._version,
            w.shape,
            quantizer.bits,
            None if rounding is None else (rounding.data_ptr(), rounding._version),
        )
        if key != self.key:
            with torch.no_grad():
                quantizer.calibrate(w)
                self.value = quantizer(w.detach())
            self.key = key
        assert self.value is not None  # (set with the key, which is never None)
        return self.value


class _WeightedQuantModule(QuantModule):
    """Shared by QuantLinear / QuantConv2d: per-output-channel weights with a cached fake-quant."""

    weight: Tensor
    bias: Tensor | None

    def _init_quant(self, w_bits: int, a_bits: int, act_channel_axis: int | None) -> None:
        self.weight_quantizer = UniformQuantizer(w_bits, channel_axis=0)
        self.input_quantizer = UniformQuantizer(a_bits, channel_axis=act_channel_axis)
        self.state = QuantState.FLOAT
        self._weight_cache = WeightCache()

    @property
    def w_bits(self) -> int:
        return self.weight_quantizer.bits

    @property
    def a_bits(self) -> int:
        return self.input_quantizer.bits

    def input_quantizers(self) -> list[_Quantizer]:
        return [self.input_quantizer]

    def quantized_weight(self) -> Tensor:
        """The fake-quantized weight (cached: :class:`WeightCache`)."""
        return self._weight_cache(self.weight_quantizer, self.weight)

    def _forward_impl(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Scale reparameterization may have created a bias this (freshly wrapped) layer lacks.
        if self.bias is None and prefix + 'bias' in state_dict:
            self.bias = nn.Parameter(
                torch.empty_like(state_dict[prefix + 'bias'], device=self.weight.device, dtype=self.weight.dtype)
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if self.state is QuantState.FLOAT:
            return self._forward_impl(x, self.weight)
        return self._forward_impl(self._quantize_input(self.input_quantizer, x), self.quantized_weight())


# (torch's nn.Linear gets its bias typed as a Parameter, though it is None for bias=False: ours is Optional.)
class QuantLinear(_WeightedQuantModule, nn.Linear):  # type: ignore[misc]
    """``nn.Linear`` with per-output-channel weight and per-tensor/per-channel input quantization."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        w_bits: int = 8,
        a_bits: int = 8,
        per_channel_input: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quant(w_bits, a_bits, -1 if per_channel_input else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, **quant_kwargs: Any) -> QuantLinear:
        """Wrap ``linear``, sharing its parameters (the state-dict keys do not change)."""
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device='meta', **quant_kwargs)
        q.weight, q.bias = linear.weight, linear.bias
        q.train(linear.training)
        return q

    def _forward_impl(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.bias)


class QuantConv2d(_WeightedQuantModule, nn.Conv2d):
    """``nn.Conv2d`` with per-output-channel weight and per-tensor (or per-channel) input."""

    def __init__(self, *args: Any, w_bits: int = 8, a_bits: int = 8, per_channel_input: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._init_quant(w_bits, a_bits, 1 if per_channel_input else None)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **quant_kwargs: Any) -> QuantConv2d:
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device='meta',
            **quant_kwargs,
        )
        q.weight, q.bias = conv.weight, conv.bias
        q.train(conv.training)
        return q

    def _forward_impl(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._conv_forward(x, weight, self.bias)


class QuantMatMul(QuantModule):
    """``a @ b`` with both operands quantized per tensor; ``a`` optionally with the log-√2 quantizer."""

    def __init__(self, a_bits: int = 8, b_bits: int | None = None, log_sqrt2_a: bool = False):
        super().__init__()
        self.quantizer_a = LogSqrt2Quantizer(a_bits) if log_sqrt2_a else UniformQuantizer(a_bits)
        self.quantizer_b = UniformQuantizer(a_bits if b_bits is None else b_bits)
        self.state = QuantState.FLOAT

    @property
    def a_bits(self) -> int:
        return self.quantizer_a.bits

    def input_quantizers(self) -> list[_Quantizer]:
        return [self.quantizer_a, self.quantizer_b]

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if self.state is QuantState.FLOAT:
            return a @ b
        return self._quantize_input(self.quantizer_a, a, 0) @ self._quantize_input(self.quantizer_b, b, 1)


def quant_modules(model: nn.Module) -> dict[str, QuantModule]:
    """Every quantized module of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantModule)}


def set_quant_state(model: nn.Module, state: QuantState) -> None:
    """Move every quantized module to ``state`` (QUANTIZED requires calibrated quantizers)."""
    modules = quant_modules(model)
    if state is QuantState.QUANTIZED:
        missing = [name for name, m in modules.items() if not m.calibrated]
        if missing:
            shown = ', '.join(missing[:8]) + (f', ... ({len(missing)} in all)' if len(missing) > 8 else '')
            raise RuntimeError(
                f'{len(missing)} quantized layer(s) received no input during calibration and have no '
                f'quantization parameters: {shown}. Calibrate on more images (or images where the '
                f'model detects something, so the RoI heads run).'
            )
    for m in modules.values():
        m.state = state
