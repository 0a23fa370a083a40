"""LRP layer scores of a timm Swin over many images, their normalisation, and the sites they rank.

``lrp_site_scores`` -> ``relative_importance`` -> an allocator in ``mmdet_lrpq.plan`` together with
``swin_sites``. Names are timm module paths (``layers.i.blocks.j.attn.qkv``, ...); map them onto
the detector with ``mmdet_lrpq.models.swin_names.swin_name_to_mmdet(name, 'timm')``.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, cast

import torch
from timm.models.swin_transformer import PatchMerging, SwinTransformer
from torch import Tensor

from ..plan.sites import SWIN_LAYER_TYPES, Site
from ..swin import check_swin
from .swin import swin_relevance


def lrp_site_scores(
    model: SwinTransformer,
    images: Iterable[Tensor],
    targets: Iterable[int | None] | None = None,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Raw LRP score of every site (DESIGN §3.4), averaged over the images.

    images:   single images ``(3, H, W)`` at the model's input size, streamed: only one batch of
              ``batch_size`` is held at a time (a ``(N, 3, H, W)`` tensor also works).
    targets:  one class index per image (``None`` for an image = its predicted class), or
              ``None`` to explain every image's predicted class. Must match ``images`` in length.
    progress: called with the number of images done after each batch.

    Deterministic for a given image order and batch size; any batch size gives the same scores
    up to float rounding. Keys are in forward order, those of :func:`swin_sites`.
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


def _linear_site(name: str, layer: Any, tokens: int, block: int, stage: int) -> Site:
    """A block's Linear as a site: its kind is the last part of its name; MACs over ``tokens`` positions."""
    macs = tokens * layer.in_features * layer.out_features
    return Site(name, 'linear', name.rsplit('.', 1)[-1], block, stage, layer.weight.numel(), macs)


def swin_sites(model: SwinTransformer) -> list[Site]:
    """The scored sites of a timm Swin, in forward order, with params and MACs per image.

    MACs are at the model's input size (``model.patch_embed.img_size``), counted as
    ``mmdet_lrpq.quant.macs`` does (Linear: output elements x in_features, over the zero-padded
    windows where the block pads; matmul: windows x heads x N x N x head_dim). ``block`` is the
    global block index; patch merging has ``block=None`` and the *timm* stage it opens (mmdet
    puts it at the end of stage ``i - 1``). The patch embedding is not scored, so not listed.
    """
    check_swin(model)
    H, W = cast(tuple[int, int], model.patch_embed.grid_size)
    sites: list[Site] = []
    block_index = 0
    for i, stage in enumerate(cast(Iterable[Any], model.layers)):
        if isinstance(stage.downsample, PatchMerging):
            H, W = (H + 1) // 2, (W + 1) // 2
            red = stage.downsample.reduction
            sites.append(
                Site(
                    f'layers.{i}.downsample.reduction',
                    'linear',
                    'reduction',
                    None,
                    i,
                    params=red.weight.numel(),
                    macs=H * W * red.in_features * red.out_features,
                )
            )
        for j, block in enumerate(cast(Iterable[Any], stage.blocks)):
            (wh, ww), attn, mlp = block.window_size, block.attn, block.mlp
            padded_tokens = math.ceil(H / wh) * wh * math.ceil(W / ww) * ww
            n = wh * ww
            attn_dim = attn.qkv.out_features // 3
            matmul_macs = padded_tokens * n * attn_dim  # (tokens / n) windows x heads x n x n x head_dim
            p = f'layers.{i}.blocks.{j}'
            where = (block_index, i)
            sites += [
                _linear_site(f'{p}.attn.qkv', attn.qkv, padded_tokens, *where),
                Site(f'{p}.attn.matmul1', 'matmul', 'matmul1', block_index, i, 0, matmul_macs),
                Site(f'{p}.attn.matmul2', 'matmul', 'matmul2', block_index, i, 0, matmul_macs),
                _linear_site(f'{p}.attn.proj', attn.proj, padded_tokens, *where),
                _linear_site(f'{p}.mlp.fc1', mlp.fc1, H * W, *where),
                _linear_site(f'{p}.mlp.fc2', mlp.fc2, H * W, *where),
            ]
            block_index += 1
    return sites
