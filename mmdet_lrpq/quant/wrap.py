"""Swap the Conv2d/Linear layers of any ``nn.Module`` for fake-quant versions, by type.

``wrap_modules(model, config_for)`` asks ``config_for(name, module)`` for every ``nn.Conv2d`` and
``nn.Linear`` (subclasses included) and replaces the module with a ``QuantConv2d`` /
``QuantLinear`` sharing its parameters, so state-dict keys are unchanged. ``config_for`` returns a
:class:`LayerQuantConfig`, or ``None`` to leave the layer in float. Architecture adapters use the
same function for their backbone sites; a bit plan is one way to build ``config_for``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..bits import check_bits
from .modules import QuantConv2d, QuantLinear, QuantModule

# Linear layers whose weight is consumed directly by F.multi_head_attention_forward: their
# forward never runs, so a wrapper would claim a quantization that does not happen.
_WEIGHT_ONLY_LINEARS = (nn.modules.linear.NonDynamicallyQuantizableLinear,)


@dataclass(frozen=True)
class LayerQuantConfig:
    """How one layer is quantized: weight bits, input-activation bits, input granularity."""

    w_bits: int = 8
    a_bits: int = 8
    per_channel_input: bool = False

    def __post_init__(self):
        check_bits(self.w_bits)
        check_bits(self.a_bits)


ConfigFn = Callable[[str, nn.Module], LayerQuantConfig | None]


def quantizable_layers(model: nn.Module) -> dict[str, nn.Conv2d | nn.Linear]:
    """The float Conv2d/Linear layers a wrapper can quantize, by qualified name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, (QuantModule, *_WEIGHT_ONLY_LINEARS))
    }


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, child, module)


def wrap_modules(model: nn.Module, config_for: ConfigFn) -> dict[str, QuantModule]:
    """Replace every quantizable layer for which ``config_for`` returns a config; return them by name."""
    wrapped: dict[str, QuantModule] = {}
    for name, layer in quantizable_layers(model).items():
        cfg = config_for(name, layer)
        if cfg is None:
            continue
        options = dict(w_bits=cfg.w_bits, a_bits=cfg.a_bits, per_channel_input=cfg.per_channel_input)
        q: QuantModule = (
            QuantConv2d.from_float(layer, **options)
            if isinstance(layer, nn.Conv2d)
            else QuantLinear.from_float(layer, **options)
        )
        set_submodule(model, name, q)
        wrapped[name] = q
    return wrapped
