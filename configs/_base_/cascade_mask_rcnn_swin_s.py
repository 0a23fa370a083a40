# Float Cascade Mask R-CNN Swin-S (official cascade_mask_rcnn_swin_small_..._giou_4conv1f_adamw_3x_coco).
_base_ = './cascade_mask_rcnn_swin_t.py'
model = dict(backbone=dict(depths=[2, 2, 18, 2], drop_path_rate=0.3))
