# Float Mask R-CNN Swin-S (mmdet 3.x zoo, 3x multi-scale crop schedule) for post-training quantization.
_base_ = 'mmdet::swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py'
custom_imports = dict(imports=['mmdet_lrpq'], allow_failed_imports=False)
model = dict(backbone=dict(init_cfg=None))
optim_wrapper = dict(type='OptimWrapper')  # the zoo config trains with CUDA AMP; tests need none
