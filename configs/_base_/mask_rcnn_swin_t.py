# Float Mask R-CNN Swin-T (mmdet 3.x zoo, 3x multi-scale crop schedule) for post-training quantization.
# Weights come from the checkpoint given to tools/test.py, so the ImageNet init is disabled.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py'
custom_imports = dict(imports=['mmdet_lrpq'], allow_failed_imports=False)
model = dict(backbone=dict(init_cfg=None))
