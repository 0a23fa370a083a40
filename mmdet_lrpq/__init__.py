"""mmdet-lrpq: LRP-guided mixed-precision post-training quantization of Swin detectors.

``quant``, ``lrp`` and ``plan`` are pure PyTorch/NumPy and never import MMDetection.
``models`` and ``engine`` register the quantized backbone and the quantization hook in
MMDetection's registries. They are imported here when the process already uses MMEngine (which is
the case when a config's ``custom_imports=['mmdet_lrpq']`` is processed), so that pure-PyTorch
users of ``mmdet_lrpq.quant`` do not pay for importing MMDetection; tools call
:func:`register_all_modules` explicitly.
"""
import sys

from .version import __version__


def register_all_modules() -> None:
    """Register the hook, the quantized backbone and the checkpoint allow-list with MMEngine."""
    from . import engine, models  # noqa: F401  (imported for their registry side effects)
    from .engine.checkpoint import allow_mmengine_checkpoints
    allow_mmengine_checkpoints()


if 'mmengine' in sys.modules:
    register_all_modules()

__all__ = ['__version__', 'register_all_modules']
