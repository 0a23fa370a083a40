# The miniature world's tiny mask rcnn quantized by QuantizationHook (CRL, W4A4 unless overridden),
# calibrated on one image of the miniature world's calib split (disjoint from train and val).
#   python tools/test.py configs/miniworld/mask_rcnn_swin_mini_quant.py checkpoints/miniworld/mask_rcnn_swin_mini.pth \
#       --cfg-options custom_hooks.0.w_bits=6 custom_hooks.0.a_bits=6
_base_ = './mask_rcnn_swin_mini.py'
custom_hooks = [dict(type='mmdet_lrpq.QuantizationHook', w_bits=4, a_bits=4, method='crl',
                     calib=dict(ann_file='annotations/instances_calib.json', img_prefix='calib/', num_images=1))]
