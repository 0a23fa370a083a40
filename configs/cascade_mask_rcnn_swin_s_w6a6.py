# Cascade Mask R-CNN Swin-S, uniform W6A6 with RepQ-ViT's protocol (its reference column):
# every Conv2d/Linear and attention matmul of the detector, log-sqrt2 post-softmax, RepQ
# reparameterization of post-LayerNorm activations, one calibration image.
#   python tools/test.py configs/cascade_mask_rcnn_swin_s_w6a6.py CKPT
_base_ = './_base_/cascade_mask_rcnn_swin_s.py'
custom_hooks = [dict(type='mmdet_lrpq.QuantizationHook', w_bits=6, a_bits=6, method='repq')]
