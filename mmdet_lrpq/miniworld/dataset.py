"""Writing the miniature world to disk: COCO instance-segmentation splits and classification splits.

Layout under ``root``::

    train/ val/ calib/ cls_train/ cls_val/          JPEG images, ``000001.jpg`` ...
    annotations/instances_<split>.json              COCO, masks as compressed RLE of the visible region
                                                    (for every split; in cls_* the labelled shape is the
                                                    largest instance)
    annotations/{cls_train,cls_val}.txt             ``<split>/<file> <label>`` per line (mmpretrain style)
    annotations/classes.txt                         one class name per line, label order

Image ``i`` of split ``s`` is rendered from ``SeedSequence([seed, index(s), i])``, so the output
does not depend on the number of worker processes, and the splits are disjoint by construction.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .render import CLASSES
from .scenes import IMAGE_SIZE, Instance, classification_scene, detection_scene

DETECTION_SPLITS = ('train', 'val', 'calib')
CLASSIFICATION_SPLITS = ('cls_train', 'cls_val')
_SPLIT_STREAM = {name: k for k, name in enumerate(DETECTION_SPLITS + CLASSIFICATION_SPLITS)}
DEFAULT_SIZES: dict[str, int] = {'train': 3000, 'val': 200, 'calib': 8, 'cls_train': 4000, 'cls_val': 400}
JPEG_QUALITY = 92


def split_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The RNG of one image: independent of every other image and of the worker that renders it."""
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAM[split], index]))


def _encode_jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='JPEG', quality=JPEG_QUALITY)
    return buffer.getvalue()


def _coco_annotations(instances: list[Instance]) -> list[dict]:
    """COCO annotation stubs (no ids): compressed RLE, its tight box and area, 1-based category."""
    anns = []
    for inst in instances:
        rle = mask_utils.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
        anns.append(
            dict(
                category_id=inst.label + 1,
                segmentation=dict(size=[int(s) for s in rle['size']], counts=rle['counts'].decode('ascii')),
                area=float(mask_utils.area(rle)),
                bbox=[float(v) for v in mask_utils.toBbox(rle)],
                iscrowd=0,
            )
        )
    return anns


def render_detection_image(seed: int, split: str, index: int) -> tuple[bytes, list[dict]]:
    """JPEG bytes and COCO annotation stubs of one detection image."""
    image, instances = detection_scene(split_rng(seed, split, index))
    return _encode_jpeg(image), _coco_annotations(instances)


def render_classification_image(seed: int, split: str, index: int) -> tuple[bytes, int, list[dict]]:
    """JPEG bytes, class index and COCO annotation stubs (labelled shape last) of one classification image."""
    image, instances = classification_scene(split_rng(seed, split, index))
    return _encode_jpeg(image), instances[-1].label, _coco_annotations(instances)


def _render_job(job: tuple[str, int, str, int]) -> tuple:
    kind, seed, split, index = job
    render = render_detection_image if kind == 'detection' else render_classification_image
    return render(seed, split, index)


def _file_name(index: int) -> str:
    return f'{index:06d}.jpg'


def _rendered(
    kind: str, seed: int, split: str, num_images: int, pool: multiprocessing.pool.Pool | None
) -> Iterable[tuple]:
    """``(index, jpeg, ...)`` per image, in index order."""
    jobs = [(kind, seed, split, i) for i in range(1, num_images + 1)]
    results = pool.imap(_render_job, jobs, chunksize=16) if pool else map(_render_job, jobs)
    for (_, _, _, index), result in zip(jobs, results):
        yield (index, *result)


def coco_categories() -> list[dict]:
    return [dict(id=k + 1, name=name, supercategory='shape') for k, name in enumerate(CLASSES)]


def _write_coco(root: Path, split: str, seed: int, images: list[dict], anns_per_image: list[list[dict]]) -> dict:
    annotations = [
        dict(id=k + 1, image_id=image_id, **ann)
        for k, (image_id, ann) in enumerate(
            (img['id'], ann) for img, anns in zip(images, anns_per_image) for ann in anns
        )
    ]
    coco = dict(
        info=dict(description=f'mmdet-lrpq miniature world, split {split}', version='1.0', seed=seed),
        licenses=[],
        images=images,
        annotations=annotations,
        categories=coco_categories(),
    )
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    with open(root / 'annotations' / f'instances_{split}.json', 'w') as f:
        json.dump(coco, f, separators=(',', ':'))
    return coco


def _image_entry(index: int) -> dict:
    return dict(id=index, file_name=_file_name(index), height=IMAGE_SIZE[0], width=IMAGE_SIZE[1])


def write_detection_split(
    root: Path, split: str, num_images: int, seed: int, pool: multiprocessing.pool.Pool | None = None
) -> dict:
    """Render a COCO split into ``root/split`` and ``root/annotations/instances_split.json``."""
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, anns_per_image = [], []
    for index, jpeg, anns in _rendered('detection', seed, split, num_images, pool):
        (image_dir / _file_name(index)).write_bytes(jpeg)
        images.append(_image_entry(index))
        anns_per_image.append(anns)
    return _write_coco(root, split, seed, images, anns_per_image)


def write_classification_split(
    root: Path, split: str, num_images: int, seed: int, pool: multiprocessing.pool.Pool | None = None
) -> list[tuple[str, int]]:
    """Render a classification split into ``root/split``, its labels into ``root/annotations/split.txt``
    and its shapes' masks into ``root/annotations/instances_split.json`` (for token-level supervision)."""
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    entries, images, anns_per_image = [], [], []
    for index, jpeg, label, anns in _rendered('classification', seed, split, num_images, pool):
        (image_dir / _file_name(index)).write_bytes(jpeg)
        entries.append((f'{split}/{_file_name(index)}', int(label)))
        images.append(_image_entry(index))
        anns_per_image.append(anns)
    _write_coco(root, split, seed, images, anns_per_image)
    with open(root / 'annotations' / f'{split}.txt', 'w') as f:
        f.writelines(f'{name} {label}\n' for name, label in entries)
    return entries


def generate(
    root: str | os.PathLike,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    workers: int = 1,
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, int]:
    """Generate every split (``sizes`` overrides :data:`DEFAULT_SIZES` per split); returns image counts."""
    root = Path(root)
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    unknown = set(sizes) - set(_SPLIT_STREAM)
    if unknown:
        raise ValueError(f'unknown splits {sorted(unknown)}; known: {sorted(_SPLIT_STREAM)}')
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    (root / 'annotations' / 'classes.txt').write_text(''.join(f'{c}\n' for c in CLASSES))
    pool = multiprocessing.get_context('fork').Pool(workers) if workers > 1 else None
    try:
        for split in DETECTION_SPLITS:
            coco = write_detection_split(root, split, sizes[split], seed, pool)
            log(f'{split}: {len(coco["images"])} images, {len(coco["annotations"])} instances')
        for split in CLASSIFICATION_SPLITS:
            entries = write_classification_split(root, split, sizes[split], seed, pool)
            log(f'{split}: {len(entries)} images')
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return {split: sizes[split] for split in _SPLIT_STREAM}
