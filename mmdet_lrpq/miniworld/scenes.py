"""Composing miniature-world images: several occluding shapes (detection) or one dominant shape
(classification) on a procedural background. Each scene is a pure function of its RNG."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .render import CLASSES, PATTERNS, background, object_colour, paint, shape_mask

IMAGE_SIZE = (224, 224)  # 224 = 4·56: every Swin stage (56, 28, 14, 7) is a whole number of 7-windows


@dataclass(frozen=True)
class Instance:
    """One annotated object: its class index, its *visible* mask after occlusion, and the pixel area
    of the whole shape (so that occlusion can be measured)."""

    label: int
    mask: np.ndarray
    full_area: int


def detection_scene(
    rng: np.random.Generator,
    size: tuple[int, int] = IMAGE_SIZE,
    num_objects: tuple[int, int] = (2, 6),
    radius: tuple[float, float] = (14.0, 42.0),
    min_visible: float = 0.5,
    attempts_per_object: int = 6,
) -> tuple[np.ndarray, list[Instance]]:
    """An RGB uint8 image with 2-6 shapes, later ones occluding earlier ones.

    A placement is rejected when it would hide more than ``1 - min_visible`` of an object already
    there, so every annotated object stays recognisable and no unannotated fragments remain.
    Objects lie fully inside the image; their colour is chosen to contrast with what is beneath.
    """
    height, width = size
    image = background(rng, size)
    owner = np.full(size, -1, dtype=np.int64)  # index of the object visible at each pixel
    full_area: list[int] = []
    labels: list[int] = []
    target = int(rng.integers(num_objects[0], num_objects[1] + 1))
    for _ in range(target * attempts_per_object):
        if len(labels) == target:
            break
        label = int(rng.integers(len(CLASSES)))
        r = float(rng.uniform(*radius))
        center = (float(rng.uniform(r, width - r)), float(rng.uniform(r, height - r)))
        mask = shape_mask(CLASSES[label], center, r, float(rng.uniform(0, 2 * np.pi)), size)
        covered = owner[mask]
        lost = np.bincount(covered[covered >= 0], minlength=len(labels))
        visible = np.bincount(owner[owner >= 0], minlength=len(labels))
        if np.any(visible - lost < min_visible * np.asarray(full_area, dtype=np.float64)):
            continue
        paint(image, mask, object_colour(rng, image[mask].mean(axis=0)), rng, PATTERNS[CLASSES[label]], center)
        owner[mask] = len(labels)
        full_area.append(int(mask.sum()))
        labels.append(label)
    instances = [Instance(label, owner == k, area) for k, (label, area) in enumerate(zip(labels, full_area))]
    return image.astype(np.uint8), instances


def classification_scene(
    rng: np.random.Generator,
    size: tuple[int, int] = IMAGE_SIZE,
    radius: tuple[float, float] = (45.0, 95.0),
    max_offset: float = 25.0,
    distractors: tuple[int, int] = (0, 2),
    distractor_radius: tuple[float, float] = (8.0, 14.0),
) -> tuple[np.ndarray, list[Instance]]:
    """An RGB uint8 image whose label is its one large, roughly centred shape (object-centric, like
    ImageNet), drawn over 0-2 small distractor shapes. Returns the image and its instances, the
    labelled (dominant) shape last."""
    height, width = size
    image = background(rng, size)
    owner = np.full(size, -1, dtype=np.int64)
    labels, full_area = [], []
    num_distractors = int(rng.integers(distractors[0], distractors[1] + 1))
    for k in range(num_distractors + 1):
        label = int(rng.integers(len(CLASSES)))
        if k < num_distractors:
            r = float(rng.uniform(*distractor_radius))
            center = (float(rng.uniform(r, width - r)), float(rng.uniform(r, height - r)))
        else:
            r = float(rng.uniform(*radius))
            center = tuple(
                float(np.clip(c / 2 + rng.uniform(-max_offset, max_offset), r, c - r)) for c in (width, height)
            )
        mask = shape_mask(CLASSES[label], center, r, float(rng.uniform(0, 2 * np.pi)), size)
        paint(image, mask, object_colour(rng, image[mask].mean(axis=0)), rng, PATTERNS[CLASSES[label]], center)
        owner[mask] = k
        labels.append(label)
        full_area.append(int(mask.sum()))
    instances = [Instance(label, owner == k, area) for k, (label, area) in enumerate(zip(labels, full_area))]
    return image.astype(np.uint8), [inst for inst in instances if inst.mask.any()]
