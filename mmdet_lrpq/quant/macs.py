"""Multiply-accumulate counts of the quantized modules, measured on a real forward (for BOPs).

Counted from the actual tensor shapes, so padding, window partition and the number of RoIs an
image produced are all reflected: Linear ``in_features · numel(out) / out_features · out_features``,
Conv2d ``numel(out) · in/groups · kh · kw``, MatMul ``batch · M · K · N``. The one MAC count: the
report, the detector plans (``engine.detector_sensitivity.measure_macs``) and the LRP plans
(``models.timm_swin.swin_sites``) all take theirs from here, so a plan's BOPs are its report's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from .modules import QuantConv2d, QuantLinear, QuantMatMul, quant_modules


def _macs(module: nn.Module, inputs: tuple, output: Tensor) -> int:
    own = getattr(module, 'macs', None)  # modules outside this package (e.g. a packed projection)
    if callable(own):
        return own(inputs, output)
    if isinstance(module, QuantLinear):
        return output.numel() * module.in_features
    if isinstance(module, QuantConv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, QuantMatMul):
        a = inputs[0]
        return output.numel() * a.shape[-1]
    return 0


@contextmanager
def count_macs(model: nn.Module) -> Iterator[dict[str, int]]:
    """Inside: every forward adds its MACs to the yielded ``{module name: macs}`` dict."""
    counts: dict[str, int] = {}
    handles = []
    for name, module in quant_modules(model).items():
        counts[name] = 0

        def hook(mod, inputs, output, name=name):
            counts[name] += _macs(mod, inputs, output)

        handles.append(module.register_forward_hook(hook))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


__all__ = ['count_macs']
