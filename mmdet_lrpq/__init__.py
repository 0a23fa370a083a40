"""mmdet-lrpq: LRP-guided mixed-precision post-training quantization of Swin detectors.

Python: :func:`quantize_` (any model) and :func:`mmdet_lrpq.apis.init_quantized_detector` (an mmdet
config and checkpoint). Configs: ``custom_imports=['mmdet_lrpq']`` plus ``QuantizationHook`` in
``custom_hooks``. ``quant``, ``lrp`` and ``plan`` are pure PyTorch/NumPy and never import
MMDetection or MMEngine; importing this package does not either (see :mod:`.registration`).
"""
from .registration import install as _install
from .registration import register_all_modules
from .version import __version__

_LAZY = {'quantize_': 'api', 'QuantConfig': 'config', 'ReconstructConfig': 'config', 'QuantReport': 'models.quantizer',
         'BitPlan': 'plan'}


def __getattr__(name: str):
    """The user-facing names, imported on first use (torch-free ``import mmdet_lrpq``)."""
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f'.{_LAZY[name]}', __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


_install()

__all__ = ['__version__', 'quantize_', 'QuantConfig', 'ReconstructConfig', 'QuantReport', 'BitPlan',
           'register_all_modules']
