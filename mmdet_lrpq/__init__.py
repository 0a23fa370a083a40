"""mmdet-lrpq: LRP-guided mixed-precision post-training quantization of Swin detectors.

Python: :func:`quantize_` (any model) and :func:`mmdet_lrpq.apis.init_quantized_detector` (an mmdet
config and checkpoint). Configs: ``custom_imports=['mmdet_lrpq']`` plus ``QuantizationHook`` in
``custom_hooks``. ``quant``, ``lrp`` and ``plan`` are pure PyTorch/NumPy and never import
MMDetection or MMEngine; importing this package does not either, and changes nothing in the
process beyond registering with MMEngine when MMEngine is already loaded (see :mod:`.registry`).
"""

import sys as _sys

from .version import __version__

_LAZY = {
    'quantize_': 'quantize',
    'QuantConfig': 'config',
    'ReconstructConfig': 'config',
    'QuantReport': 'models.report',
    'BitPlan': 'plan',
    'export_onnx': 'export',
}


def __getattr__(name: str):
    """The user-facing names, imported on first use (torch-free ``import mmdet_lrpq``)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f'.{_LAZY[name]}', __name__), name)
    import sys

    loaded = sys.modules.get(f'{__name__}.{name}')
    if loaded is not None:  # mmdet_lrpq.ops, loaded before this package by the mmcv._ext hook
        return loaded
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def register_all_modules() -> None:
    """Register the hook, the quantized backbone and their plain names with MMEngine/MMDetection
    (idempotent; :mod:`mmdet_lrpq.registry`)."""
    from .registry import register_all_modules as register

    register()


if 'mmengine.registry' in _sys.modules:  # imported by a config's custom_imports: register now
    register_all_modules()

__all__ = [
    '__version__',
    'quantize_',
    'QuantConfig',
    'ReconstructConfig',
    'QuantReport',
    'BitPlan',
    'export_onnx',
    'register_all_modules',
]
