"""Architecture adapters: quantization sites of mmdet/timm Swin, name mapping, quantized backbone."""
