# Mask R-CNN Swin-T, LRP-QViT mixed precision MP4 (average 4 bits, weight memory
# <= uniform 4-bit): the LRP bit plan for the backbone, 4 bits elsewhere, CRL reparameterization.
# The plan is made by `python tools/lrp_plan.py` (the command is recorded inside the plan file).
#   python tools/test.py configs/mask_rcnn_swin_t_mp4.py CKPT
_base_ = './_base_/mask_rcnn_swin_t.py'
custom_hooks = [dict(type='mmdet_lrpq.QuantizationHook', plan='{{ fileDirname }}/plans/swin_t_mp4.json',
                     method='crl')]
