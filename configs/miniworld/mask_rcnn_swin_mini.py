# Tiny Mask R-CNN with a Swin backbone for the miniature world (tools/miniworld/generate.py): the
# official Mask R-CNN Swin-T layout (Swin -> FPN -> RPN -> Shared2FC box head + 4-conv mask head)
# with CPU-sized widths. The backbone is the miniature world's timm classifier
# (checkpoints/miniworld/swin_mini_cls.pth) converted by tools/miniworld/convert_classifier.py,
# as the COCO detectors start from ImageNet classifiers. Trained by tools/miniworld/train_all.py;
# the result is checkpoints/miniworld/mask_rcnn_swin_mini.pth.
#   python tools/test.py configs/miniworld/mask_rcnn_swin_mini.py checkpoints/miniworld/mask_rcnn_swin_mini.pth
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    './_base_/miniworld_instance.py',
    './_base_/schedule_miniworld.py',
]
custom_imports = dict(imports=['mmdet_lrpq'], allow_failed_imports=False)

backbone_init = 'work_dirs/miniworld/swin_mini_backbone_mmdet.pth'
num_classes = 8
model = dict(
    backbone=dict(
        _delete_=True, type='SwinTransformer', embed_dims=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
        window_size=7, mlp_ratio=4, qkv_bias=True, qk_scale=None, drop_rate=0., attn_drop_rate=0.,
        drop_path_rate=0.1, patch_norm=True, out_indices=(0, 1, 2, 3), with_cp=False, convert_weights=False,
        init_cfg=dict(type='Pretrained', checkpoint=backbone_init)),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=64, num_outs=5),
    rpn_head=dict(
        in_channels=64, feat_channels=64,
        # objects are 15-90 px: anchors 16..256 px instead of COCO's 32..512
        anchor_generator=dict(scales=[4])),
    # RoIAlign with one sample per bin: what the adaptive default (sampling_ratio=0) does anyway for
    # RoIs under 7 (box) / 14 (mask) feature pixels, at a third of its CPU cost on larger ones
    roi_head=dict(
        bbox_roi_extractor=dict(roi_layer=dict(sampling_ratio=1), out_channels=64),
        bbox_head=dict(in_channels=64, fc_out_channels=256, num_classes=num_classes),
        mask_roi_extractor=dict(roi_layer=dict(sampling_ratio=1), out_channels=64),
        # two convs instead of four: the mask branch dominated the CPU training step
        mask_head=dict(num_convs=2, in_channels=64, conv_out_channels=64, num_classes=num_classes)),
    # at most six objects per image: fewer proposals and RoI samples than COCO's 1000 / 512
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=1000, max_per_img=300)))
