"""Images for LRP scoring: an ImageNet-style class-folder tree or a flat folder, read lazily.

Real folders contain greyscale, CMYK and palette JPEGs, odd sizes and the occasional broken
file; every image is converted to RGB and preprocessed with the model's own timm evaluation
transform (shorter-side resize by ``crop_pct``, center crop to the model's input size,
mean/std), and a file that cannot be decoded stops the run with its path in the message.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from torch import Tensor, nn

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.webp', '.tif', '.tiff')
PathLike = str | os.PathLike


class UnreadableImageError(ValueError):
    """An image file that PIL cannot decode (truncated, corrupt, not an image)."""


@dataclass(frozen=True)
class ImageItem:
    """One image file and its class index (from ``wnids.txt``), ``None`` when unknown."""

    path: Path
    label: int | None = None


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith('.') and path.suffix.lower() in IMAGE_EXTENSIONS


def read_wnids(path: PathLike) -> list[str]:
    """Class ids in class-index order: the first word of each non-empty line (``n01440764 tench``)."""
    return [line.split()[0] for line in Path(path).read_text().splitlines() if line.strip()]


def list_images(root: PathLike, num_images: int | None = None, wnids: PathLike | None = None) -> list[ImageItem]:
    """The images under ``root`` in a stable order, optionally only the first ``num_images``.

    A flat folder (images directly in ``root``): sorted by file name. Otherwise every immediate
    subfolder is a class: classes sorted by name, images sorted within each, and the order goes
    round-robin over the classes (first image of every class, then the second, ...), so the
    first N images are spread over as many classes as possible. Labels come from ``wnids``
    (default: ``wnids.txt`` in ``root`` or its parent, if present) by folder name.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f'image folder not found: {root}')
    if num_images is not None and num_images < 1:
        raise ValueError(f'num_images must be >= 1, got {num_images}')
    flat = sorted(p for p in root.iterdir() if _is_image(p))
    if flat:
        items = [ImageItem(p) for p in flat]
    else:
        if wnids is None:
            wnids = next((p for p in (root / 'wnids.txt', root.parent / 'wnids.txt') if p.is_file()), None)
        index = {wnid: i for i, wnid in enumerate(read_wnids(wnids))} if wnids is not None else {}
        classes = [
            (d, sorted(p for p in d.iterdir() if _is_image(p))) for d in sorted(p for p in root.iterdir() if p.is_dir())
        ]
        depth = max((len(files) for _, files in classes), default=0)
        items = [ImageItem(files[k], index.get(d.name)) for k in range(depth) for d, files in classes if k < len(files)]
    if not items:
        raise ValueError(
            f'no images found in {root} (looked for {", ".join(IMAGE_EXTENSIONS)} files '
            f'directly in it and in its immediate subfolders)'
        )
    if num_images is not None:
        if num_images > len(items):
            raise ValueError(f'asked for {num_images} images but {root} has only {len(items)}')
        items = items[:num_images]
    return items


def eval_transform(model: nn.Module) -> Callable[[Image.Image], Tensor]:
    """timm's evaluation transform for ``model`` at the model's own input size.

    The data config (interpolation, ``crop_pct``, mean/std) comes from the model's pretrained
    config when it has one, timm's ImageNet defaults otherwise; the input size is always the
    one the model was built for (``patch_embed.img_size``), which a custom model's config lacks.
    """
    config = resolve_model_data_config(model)
    img_size = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if img_size is not None:
        config['input_size'] = (3, *img_size)
    return create_transform(**config, is_training=False)


def load_image(path: PathLike, transform: Callable[[Image.Image], Tensor]) -> Tensor:
    """Decode ``path`` as RGB (greyscale, CMYK, palette, alpha converted) and transform it."""
    try:
        with Image.open(path) as image:
            rgb = image.convert('RGB')  # decodes the whole file: truncation surfaces here
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... by format
        raise UnreadableImageError(f'cannot read image {path}: {error}') from error
    return transform(rgb)


def iter_images(items: Iterable[ImageItem], transform: Callable[[Image.Image], Tensor]) -> Iterator[Tensor]:
    """Decode one image at a time (what :func:`mmdet_lrpq.lrp.lrp_site_scores` streams)."""
    for item in items:
        yield load_image(item.path, transform)


def iter_batches(
    items: Iterable[ImageItem], transform: Callable[[Image.Image], Tensor], batch_size: int
) -> Iterator[tuple[Tensor, list[ImageItem]]]:
    """``(B, 3, H, W)`` batches with the items they came from; the last batch may be smaller."""
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, batch_size)):
        yield torch.stack([load_image(item.path, transform) for item in batch]), batch
