"""Architecture adapters behind one protocol, and the quantization driver that uses them.

Family adapters that need their library (``mmdet_swin``: MMDetection; ``timm_swin``: timm) are
imported only when a model contains that library's modules (:func:`.base.find_adapters`); import
them from their modules directly (``mmdet_lrpq.models.mmdet_swin.QuantWindowMSA``, ...).
"""

from .base import FAMILIES, Adapter, ReparamPair, find_adapters
from .quantizer import ModelQuantizer
from .report import QuantReport
from .swin_names import convert_swin_to_mmdet, load_mmdet_swin_from_timm, swin_name_to_mmdet

__all__ = [
    'FAMILIES',
    'Adapter',
    'ReparamPair',
    'find_adapters',
    'ModelQuantizer',
    'QuantReport',
    'convert_swin_to_mmdet',
    'load_mmdet_swin_from_timm',
    'swin_name_to_mmdet',
]
