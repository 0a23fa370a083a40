# Tiny Cascade Mask R-CNN with a Swin backbone for the miniature world, shaped like the official
# cascade_mask_rcnn_swin_tiny_..._giou_4conv1f model (three stages of conv+fc box heads with BN,
# GIoU loss on decoded boxes, the three stages' IoU thresholds and target stds) at CPU size: one
# shared conv instead of four. Backbone, neck, RPN, data and schedule as in mask_rcnn_swin_mini.py.
#   python tools/test.py configs/miniworld/cascade_mask_rcnn_swin_mini.py \
#       checkpoints/miniworld/cascade_mask_rcnn_swin_mini.pth
_base_ = './mask_rcnn_swin_mini.py'


def _bbox_head(stds):
    return dict(
        type='ConvFCBBoxHead', num_shared_convs=1, num_shared_fcs=1, in_channels=64, conv_out_channels=64,
        fc_out_channels=256, roi_feat_size=7, num_classes=8,
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=stds),
        reg_class_agnostic=False, reg_decoded_bbox=True,
        norm_cfg=dict(type='BN', requires_grad=True),
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=10.0))


def _rcnn_stage(iou):
    return dict(
        assigner=dict(type='MaxIoUAssigner', pos_iou_thr=iou, neg_iou_thr=iou, min_pos_iou=iou,
                      match_low_quality=False, ignore_iof_thr=-1),
        sampler=dict(type='RandomSampler', num=64, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True),
        mask_size=28, pos_weight=-1, debug=False)


model = dict(
    type='CascadeRCNN',
    roi_head=dict(
        _delete_=True,
        type='CascadeRoIHead',
        num_stages=3,
        stage_loss_weights=[1, 0.5, 0.25],
        bbox_roi_extractor=dict(
            type='SingleRoIExtractor', roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=1),
            out_channels=64, featmap_strides=[4, 8, 16, 32]),
        bbox_head=[_bbox_head([0.1, 0.1, 0.2, 0.2]), _bbox_head([0.05, 0.05, 0.1, 0.1]),
                   _bbox_head([0.033, 0.033, 0.067, 0.067])],
        mask_roi_extractor=dict(
            type='SingleRoIExtractor', roi_layer=dict(type='RoIAlign', output_size=14, sampling_ratio=1),
            out_channels=64, featmap_strides=[4, 8, 16, 32]),
        mask_head=dict(
            type='FCNMaskHead', num_convs=2, in_channels=64, conv_out_channels=64, num_classes=8,
            loss_mask=dict(type='CrossEntropyLoss', use_mask=True, loss_weight=1.0))),
    train_cfg=dict(rcnn=[_rcnn_stage(0.5), _rcnn_stage(0.6), _rcnn_stage(0.7)]))
