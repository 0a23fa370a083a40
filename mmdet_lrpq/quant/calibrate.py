"""Calibration driver: one forward with every quantizer observing, then every quantizer fixed.

RepQ-ViT's protocol: each activation quantizer fixes its parameters from the first input it
sees and quantizes that very input, so later layers are calibrated on the quantized outputs of
earlier ones; weights are quantized from the start. Several calibration images therefore go
through as **one batch** (as RepQ-ViT's calibration batch does), not as several forwards: a
second forward would see fixed quantizers and add nothing. Deterministic: no sampling anywhere.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .modules import QuantState, quant_modules, set_quant_state


@contextmanager
def calibrating(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: every quantized module calibrates on its first non-empty input. On exit: QUANTIZED.

    Raises (listing them) if some quantized layers never received input, instead of leaving them
    silently in float; on any failure every module is back in FLOAT.
    """
    if not quant_modules(model):
        raise ValueError('the model has no quantized modules to calibrate; wrap it first')
    set_quant_state(model, QuantState.CALIBRATING)
    try:
        yield model
        set_quant_state(model, QuantState.QUANTIZED)
    except BaseException:
        set_quant_state(model, QuantState.FLOAT)   # never leave a half-calibrated model behind
        raise


def calibrate(model: nn.Module, forward: Callable[[nn.Module], Any]) -> Any:
    """Run ``forward(model)`` once under :func:`calibrating` and ``torch.no_grad``; return its output."""
    with calibrating(model), torch.no_grad():
        return forward(model)
