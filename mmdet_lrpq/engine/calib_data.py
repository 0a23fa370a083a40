"""Calibration images for detectors: which ones (seeded, logged by id), streamed in small batches.

Default source: ``train`` — images drawn with a seeded RNG from the training annotations
(``annotations/instances_train2017.json`` / ``train2017/`` under the test set's ``data_root``),
disjoint from the evaluation images. ``source='test'`` takes the first test images in order,
which with one image reproduces RepQ-ViT's protocol (val2017 image 000000397133, the first of the
official annotation file; ``image_ids=[397133]`` pins it on any copy). The test pipeline of the
config is used (same resize as evaluation; under test-time augmentation, its first variant).

Images are loaded lazily and go through the model ``batch_size`` at a time (default 1), so memory
does not grow with ``num_images`` (see :mod:`mmdet_lrpq.quant.calibrate` for how batches combine).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import os.path as osp
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..quant.options import from_options

SOURCES = ('train', 'test')


class CalibrationDataError(ValueError):
    """Calibration images that cannot calibrate: unreadable, or carrying no information (constant)."""


@dataclass(frozen=True)
class CalibSettings:
    """Which images calibrate, from where, and how many per forward (the hook's ``calib=dict(...)``)."""

    source: str = 'train'
    num_images: int = 1
    seed: int = 0
    ann_file: str | None = None  # relative to data_root, or absolute
    img_prefix: str | None = None  # relative to data_root, or absolute
    data_root: str | None = None  # default: the test dataset's data_root
    image_ids: tuple | None = None  # exact COCO image ids to use (overrides num_images/seed)
    batch_size: int = 1  # images per calibration forward (peak memory grows with it)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f'calib.source must be one of {SOURCES}, got {self.source!r}')
        if self.image_ids is not None:
            if not self.image_ids:
                raise ValueError('calib.image_ids is empty: calibration needs at least one image')
            object.__setattr__(self, 'image_ids', tuple(self.image_ids))
            object.__setattr__(self, 'num_images', len(self.image_ids))
        if isinstance(self.num_images, bool) or not isinstance(self.num_images, int) or self.num_images < 1:
            raise ValueError(
                f'calib.num_images must be a positive integer, got {self.num_images!r} '
                f'(calibration needs at least one image)'
            )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f'calib.batch_size must be a positive integer, got {self.batch_size!r}')

    @classmethod
    def from_options(cls, options: dict | None) -> CalibSettings:
        return from_options(cls, dict(options or {}), 'calib')

    def describe(self) -> dict:
        out = asdict(self)
        out['image_ids'] = None if self.image_ids is None else list(self.image_ids)
        return out


def plain_pipeline(pipeline: list) -> list:
    """A test pipeline without test-time augmentation: each ``TestTimeAug`` stage's first variant."""
    out = []
    for step in pipeline:
        if step.get('type') == 'TestTimeAug':
            out += [copy.deepcopy(choices[0]) for choices in step['transforms']]
        else:
            out.append(copy.deepcopy(step))
    return out


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
    if 'pipeline' in cfg:
        cfg['pipeline'] = plain_pipeline(cfg['pipeline'])
    cfg['test_mode'] = True
    cfg.pop('indices', None)  # an evaluation subset does not restrict where calibration images come from
    return cfg


def pipeline_digest(test_dataset_cfg: Any, calib: CalibSettings) -> str:
    """sha256 of the pipeline the calibration images go through (another resize is another calibration)."""
    pipeline = _dataset_cfg(test_dataset_cfg, calib).get('pipeline')
    return hashlib.sha256(json.dumps(pipeline, sort_keys=True, default=str).encode()).hexdigest()


def _check_paths(cfg: dict, calib: CalibSettings) -> None:
    root = cfg.get('data_root') or ''
    ann = osp.join(root, cfg['ann_file'])
    img_dir = osp.join(root, cfg.get('data_prefix', {}).get('img', ''))
    hint = (
        "set custom_hooks' calib=dict(ann_file=..., img_prefix=...) or data_root, or use calib=dict(source='test')"
        if calib.source == 'train'
        else 'check test_dataloader.dataset'
    )
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


class CalibrationImages:
    """The chosen calibration images: their ids now, their batches lazily (one load per use)."""

    def __init__(self, test_dataset_cfg: Any, calib: CalibSettings, logger: logging.Logger | None = None):
        from mmdet.registry import DATASETS

        self.calib = calib
        self.logger = logger or logging.getLogger('mmdet_lrpq')
        self.test_dataset_cfg = test_dataset_cfg
        self.constant: list[str] = []
        cfg = _dataset_cfg(test_dataset_cfg, calib)
        _check_paths(cfg, calib)
        try:
            self.dataset = DATASETS.build(cfg)
        except ValueError as err:  # mmengine serializes the data list with np.concatenate
            if 'need at least one array' in str(err):
                raise ValueError(
                    f'the calibration dataset has zero images ({cfg["ann_file"]}); check its annotation file'
                ) from err
            raise
        self.indices = pick_indices(self.dataset, calib)
        infos = [self.dataset.get_data_info(i) for i in self.indices]
        self.paths = [info.get('img_path', f'index {i}') for i, info in zip(self.indices, infos)]
        self.ids = [info.get('img_id', os.path.basename(p)) for info, p in zip(infos, self.paths)]
        for path in self.paths:
            if not osp.isfile(path):
                raise FileNotFoundError(f'calibration image listed in the annotations is missing: {path}')

    def __len__(self) -> int:
        return len(self.indices)

    def identity(self) -> dict:
        """What is actually fed, for a calibrated state's identity: the files (resolved paths, recorded to
        be named; not compared, so a moved copy of the same images still matches), the sha256 of their
        bytes in order, and the sha256 of the pipeline that preprocesses them."""
        from ..models.state import file_digest

        digests = [file_digest(p) for p in self.paths]
        return {
            'image_paths': [osp.realpath(p) for p in self.paths],
            'image_sha256': hashlib.sha256('\n'.join(digests).encode()).hexdigest(),
            'pipeline_sha256': pipeline_digest(self.test_dataset_cfg, self.calib),
        }

    def _item(self, index: int, path: str, image_id: Any) -> dict:
        try:
            item = self.dataset[index]
        except Exception as err:  # decoding errors surface from deep inside mmcv: name the file instead
            raise CalibrationDataError(
                f'calibration image {path} could not be loaded ({type(err).__name__}: '
                f'{err}); is it a valid image file? Replace it, or choose other images '
                f'(calib.image_ids or calib.seed)'
            ) from err
        image = item['inputs']
        if image.dim() == 3 and image.numel() and bool((image.amax((-2, -1)) == image.amin((-2, -1))).all()):
            self.constant.append(path)
            self.logger.warning(
                f'calibration image {image_id} ({path}) is constant (one colour everywhere): it '
                f'carries no information for the activation ranges; prefer real images'
            )
        elif (
            image.dim() == 3
            and image.shape[0] == 3
            and bool((image[0] == image[1]).all() and (image[1] == image[2]).all())
        ):
            self.logger.warning(
                f'calibration image {image_id} ({path}) is greyscale: its three channels are equal, '
                f'unlike the colour images the detector sees; a greyscale calibration image can cost '
                f'many AP points at low bits. Prefer colour images (calib.image_ids or calib.seed).'
            )
        return item

    def batches(self) -> Iterator[dict]:
        """Collated batches of ``batch_size`` images, loaded as they are consumed."""
        from mmengine.dataset import pseudo_collate

        step = self.calib.batch_size
        self.constant = []
        for start in range(0, len(self.indices), step):
            chunk = zip(
                self.indices[start : start + step], self.paths[start : start + step], self.ids[start : start + step]
            )
            yield pseudo_collate([self._item(i, p, image_id) for i, p, image_id in chunk])
        if self.constant and len(self.constant) == len(self.indices):
            raise CalibrationDataError(
                f'every calibration image is constant ({", ".join(self.constant[:3])}'
                f'{", ..." if len(self.constant) > 3 else ""}): the activation ranges collapse and the quantized '
                f'model would be meaningless (a classifier drops to chance). Calibrate on real images '
                f'(calib.image_ids, calib.seed, or another calib.ann_file)'
            )


def batch_input_hw(model, batch: dict) -> tuple[int, int]:
    """(height, width) of the padded network input the data preprocessor makes of ``batch``."""
    return tuple(model.data_preprocessor(batch, False)['inputs'].shape[-2:])
