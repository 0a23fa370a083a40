"""Calibration images for the hook: which ones (seeded, logged by id) and as one batch.

Default source: ``train`` — images drawn with a seeded RNG from the training annotations
(``annotations/instances_train2017.json`` / ``train2017/`` under the test set's ``data_root``),
disjoint from the evaluation images. ``source='test'`` takes the first test images in order,
which with one image reproduces RepQ-ViT's protocol (val2017 image 000000397133, the first of the
official annotation file; ``image_ids=[397133]`` pins it on any copy). The test
pipeline of the config is used (same resize as evaluation). N images form one batch.
"""
from __future__ import annotations

import copy
import os
import os.path as osp
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

SOURCES = ('train', 'test')


@dataclass
class CalibSettings:
    source: str = 'train'
    num_images: int = 1
    seed: int = 0
    ann_file: Optional[str] = None     # relative to data_root, or absolute
    img_prefix: Optional[str] = None   # relative to data_root, or absolute
    data_root: Optional[str] = None    # default: the test dataset's data_root
    image_ids: Optional[list] = None   # exact COCO image ids to use (overrides num_images/seed)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f'calib.source must be one of {SOURCES}, got {self.source!r}')
        if self.image_ids is not None:
            if not self.image_ids:
                raise ValueError('calib.image_ids is empty: calibration needs at least one image')
            self.num_images = len(self.image_ids)
        if not isinstance(self.num_images, int) or self.num_images < 1:
            raise ValueError(f'calib.num_images must be a positive integer, got {self.num_images!r} '
                             f'(calibration needs at least one image)')


def _dataset_cfg(test_dataset_cfg: Any, calib: CalibSettings) -> dict:
    cfg = copy.deepcopy(dict(test_dataset_cfg))
    if calib.data_root is not None:
        cfg['data_root'] = calib.data_root
    if calib.source == 'train':
        cfg['ann_file'] = calib.ann_file or 'annotations/instances_train2017.json'
        cfg['data_prefix'] = dict(img=calib.img_prefix or 'train2017/')
    else:
        if calib.ann_file is not None:
            cfg['ann_file'] = calib.ann_file
        if calib.img_prefix is not None:
            cfg['data_prefix'] = dict(img=calib.img_prefix)
    cfg['test_mode'] = True
    cfg.pop('indices', None)   # an evaluation subset does not restrict where calibration images come from
    return cfg


def _check_paths(cfg: dict, calib: CalibSettings) -> None:
    root = cfg.get('data_root') or ''
    ann = osp.join(root, cfg['ann_file'])
    img_dir = osp.join(root, cfg.get('data_prefix', {}).get('img', ''))
    hint = (f"set custom_hooks' calib=dict(ann_file=..., img_prefix=...) or data_root, or use "
            f"calib=dict(source='test')" if calib.source == 'train' else 'check test_dataloader.dataset')
    if not osp.isfile(ann):
        raise FileNotFoundError(f'calibration annotation file not found: {ann} ({calib.source} source); {hint}')
    if not osp.isdir(img_dir):
        raise FileNotFoundError(f'calibration image directory not found: {img_dir} ({calib.source} source); {hint}')


def pick_indices(dataset, calib: CalibSettings) -> list[int]:
    """Given ids, else a seeded choice for 'train' and the first images for 'test'."""
    n_available = len(dataset)
    if calib.image_ids is not None:
        index = {dataset.get_data_info(i).get('img_id'): i for i in range(n_available)}
        missing = [i for i in calib.image_ids if i not in index]
        if missing:
            raise ValueError(f'calibration image ids not in the {calib.source} annotations: {missing[:10]}')
        return [index[i] for i in calib.image_ids]
    if n_available == 0:
        raise ValueError('the calibration dataset has zero images; check its annotation file')
    if calib.num_images > n_available:
        raise ValueError(f'calib.num_images={calib.num_images} but only {n_available} calibration images exist')
    if calib.source == 'test':
        return list(range(calib.num_images))
    rng = np.random.default_rng(calib.seed)
    return sorted(rng.choice(n_available, size=calib.num_images, replace=False).tolist())


def build_calibration_batch(test_dataset_cfg: Any, calib: CalibSettings) -> tuple[dict, list]:
    """The calibration images as one collated data batch, and their image ids."""
    from mmdet.registry import DATASETS
    from mmengine.dataset import pseudo_collate

    cfg = _dataset_cfg(test_dataset_cfg, calib)
    _check_paths(cfg, calib)
    try:
        dataset = DATASETS.build(cfg)
    except ValueError as err:  # mmengine serializes the data list with np.concatenate
        if 'need at least one array' in str(err):
            raise ValueError(f"the calibration dataset has zero images ({cfg['ann_file']}); check its "
                             f"annotation file") from err
        raise
    items, ids = [], []
    for i in pick_indices(dataset, calib):
        info = dataset.get_data_info(i)
        path = info.get('img_path', f'index {i}')
        if not osp.isfile(path):
            raise FileNotFoundError(f'calibration image listed in the annotations is missing: {path}')
        try:
            item = dataset[i]
        except Exception as err:  # decoding errors surface from deep inside mmcv: name the file instead
            raise RuntimeError(f'calibration image {path} could not be loaded ({type(err).__name__}: {err}); '
                               f'is it a valid image file?') from err
        items.append(item)
        ids.append(info.get('img_id', os.path.basename(path)))
    return pseudo_collate(items), ids


def batch_input_hw(model, batch: dict) -> tuple[int, int]:
    """(height, width) of the padded network input the data preprocessor makes of ``batch``."""
    return tuple(model.data_preprocessor(batch, False)['inputs'].shape[-2:])
