"""LRP layer scores of a timm Swin over many images, and their normalisation.

``lrp_site_scores`` -> ``relative_importance`` -> an allocator in ``mmdet_lrpq.plan`` together with
the sites they rank (``mmdet_lrpq.models.timm_swin.swin_sites``: params and measured MACs). Names
are timm module paths (``layers.i.blocks.j.attn.qkv``, ...); map them onto the detector with
``mmdet_lrpq.models.swin_names.swin_name_to_mmdet(name, 'timm')``.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import Tensor

from ..plan.sites import SWIN_LAYER_TYPES
from ..swin import check_swin
from .swin import swin_relevance


def lrp_site_scores(
    model: SwinTransformer,
    images: Iterable[Tensor],
    targets: Iterable[int | None] | None = None,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Raw LRP score of every site (docs/method.md), averaged over the images.

    images:   single images ``(3, H, W)`` at the model's input size, streamed: only one batch of
              ``batch_size`` is held at a time (a ``(N, 3, H, W)`` tensor also works).
    targets:  one class index per image (``None`` for an image = its predicted class), or
              ``None`` to explain every image's predicted class. Must match ``images`` in length.
    progress: called with the number of images done after each batch.

    Deterministic for a given image order and batch size; any batch size gives the same scores
    up to float rounding. Keys are the sites of :func:`mmdet_lrpq.swin.swin_site_layout`, in forward order.
    """
    check_swin(model)
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    totals: dict[str, Tensor] = {}
    done = 0
    for batch, batch_targets in _batches(images, targets, batch_size):
        result = swin_relevance(model, batch, batch_targets)
        for site, per_image in result.site_scores.items():
            totals[site] = totals.get(site, 0) + per_image.sum()
        done += batch.shape[0]
        if progress is not None:
            progress(done)
    if not done:
        raise ValueError('lrp_site_scores: no images were given')
    return {site: float(total) / done for site, total in totals.items()}


def _batches(
    images: Iterable[Tensor], targets: Iterable[int | None] | None, batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    pairs = zip(images, itertools.repeat(None) if targets is None else targets, strict=targets is not None)
    while chunk := list(itertools.islice(pairs, batch_size)):
        batch = torch.stack([image for image, _ in chunk])
        yield (
            batch,
            torch.tensor([-1 if t is None else int(t) for _, t in chunk], dtype=torch.long, device=batch.device),
        )


def site_layer_type(name: str) -> str:
    """Layer type of a site name (its last component): ``qkv``, ``matmul1``, ..., ``reduction``."""
    layer_type = name.rsplit('.', 1)[-1]
    if layer_type not in SWIN_LAYER_TYPES:
        raise ValueError(f'{name!r} is not a Swin site name (layer type {layer_type!r} not in {SWIN_LAYER_TYPES})')
    return layer_type


def relative_importance(raw: Mapping[str, float]) -> dict[str, float]:
    """Scores normalised within each layer type: ``score / mean(scores of that type)``.

    The paper's Eq. 23 (relative importance) is missing from our copy; dividing by the type's
    mean makes 1.0 "average importance for its type", so a qkv and an fc2 can be compared and
    ranked together although their raw scores differ in scale by orders of magnitude. A type
    whose scores are all zero carries no ranking information: all its sites get 1.0.
    """
    by_type: dict[str, list[float]] = defaultdict(list)
    for name, score in raw.items():
        if not math.isfinite(score) or score < 0:
            raise ValueError(f'LRP score of {name!r} must be finite and >= 0, got {score}')
        by_type[site_layer_type(name)].append(score)
    means = {layer_type: sum(scores) / len(scores) for layer_type, scores in by_type.items()}
    return {
        name: score / means[site_layer_type(name)] if means[site_layer_type(name)] > 0 else 1.0
        for name, score in raw.items()
    }
