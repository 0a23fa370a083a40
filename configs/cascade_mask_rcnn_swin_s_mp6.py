# Cascade Mask R-CNN Swin-S, LRP-QViT mixed precision MP6 (average 6 bits, weight memory
# <= uniform 6-bit): the LRP bit plan for the backbone, 6 bits elsewhere, CRL reparameterization.
# The plan is made by `python tools/lrp_plan.py` (the command is recorded inside the plan file).
#   python tools/test.py configs/cascade_mask_rcnn_swin_s_mp6.py CKPT
_base_ = './_base_/cascade_mask_rcnn_swin_s.py'
custom_hooks = [dict(type='mmdet_lrpq.QuantizationHook', plan='{{ fileDirname }}/plans/swin_s_mp6.json',
                     method='crl')]
