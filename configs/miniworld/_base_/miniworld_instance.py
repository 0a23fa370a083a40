# The miniature world as an MMDetection COCO instance-segmentation dataset: 224x224 images of
# eight shapes (tools/miniworld/generate.py --out data/miniworld). Train on `train`, evaluate on `val`
# (CocoMetric, bbox + segm); `calib` is a separate small split for PTQ calibration.
dataset_type = 'CocoDataset'
data_root = 'data/miniworld/'
backend_args = None
metainfo = dict(
    classes=('circle', 'square', 'triangle', 'pentagon', 'hexagon', 'star', 'cross', 'ring'),
    palette=[(220, 20, 60), (0, 130, 200), (60, 180, 75), (245, 130, 48), (145, 30, 180), (255, 225, 25),
             (70, 240, 240), (240, 50, 230)])

# Images are already 224x224 (a multiple of 32 and of the Swin windows); Resize keeps that size but
# records scale_factor, which the heads need to map boxes back.
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(224, 224), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(224, 224), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]


def _split(name, **fields):
    # One split of the world as a dataset: annotations/instances_<name>.json, images in <name>/.
    # A function, not a variable, so that it stays out of the resolved config.
    return dict(type=dataset_type, data_root=data_root, metainfo=metainfo,
                ann_file=f'annotations/instances_{name}.json', data_prefix=dict(img=f'{name}/'),
                **fields, backend_args=backend_args)


# Training loads in the main process: the detectors train side by side, one core each, and a loader
# worker only competes for those cores (measured: 5-8 % slower per iteration with num_workers=1).
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=_split('train', filter_cfg=dict(filter_empty_gt=True, min_size=32), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=1,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=_split('val', test_mode=True, pipeline=test_pipeline))
test_dataloader = val_dataloader

val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/instances_val.json',
    metric=['bbox', 'segm'],
    format_only=False,
    backend_args=backend_args)
test_evaluator = val_evaluator
