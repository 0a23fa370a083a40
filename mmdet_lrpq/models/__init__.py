"""Architecture adapters: quantization sites of mmdet/timm Swin, name mapping, quantized backbone."""
from .detector import ADAPTERS, DetectorQuantizer, QuantizationResult, QuantSettings, find_adapter
from .mmdet_swin import QuantWindowMSA, SwinAdapter
from .quant_swin import QuantSwinTransformer
from .swin_names import convert_swin_to_mmdet, load_mmdet_swin_from_timm, swin_name_to_mmdet

__all__ = ['ADAPTERS', 'DetectorQuantizer', 'QuantizationResult', 'QuantSettings', 'find_adapter',
           'QuantWindowMSA', 'SwinAdapter', 'QuantSwinTransformer', 'convert_swin_to_mmdet',
           'load_mmdet_swin_from_timm', 'swin_name_to_mmdet']
