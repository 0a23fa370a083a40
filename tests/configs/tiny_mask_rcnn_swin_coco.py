# A small Swin Mask R-CNN on COCO's 80 classes, for fast end-to-end tests of the quantization hook
# (random weights: tests set test_cfg.rcnn.score_thr=0 so that the mask head runs).
_base_ = '../../configs/_base_/mask_rcnn_swin_t.py'
model = dict(
    backbone=dict(embed_dims=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], drop_path_rate=0.0),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(in_channels=64, fc_out_channels=128),
        mask_roi_extractor=dict(out_channels=64),
        mask_head=dict(in_channels=64, conv_out_channels=64),
    ),
    test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=300), rcnn=dict(score_thr=0.0, max_per_img=20)),
)
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=(512, 320), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
test_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False, dataset=dict(pipeline=test_pipeline, indices=3)
)
val_dataloader = test_dataloader
test_evaluator = dict(format_only=False)
custom_hooks = [dict(type='mmdet_lrpq.QuantizationHook', w_bits=4, a_bits=4, method='crl')]
default_hooks = dict(logger=dict(interval=1))
