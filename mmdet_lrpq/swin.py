"""timm's ``SwinTransformer`` as relevance and quantization both read it: what is covered, units, sites.

LRP (:mod:`mmdet_lrpq.lrp`) scores the sites of this list and the timm adapter
(:mod:`mmdet_lrpq.models.timm_swin`) quantizes them; both read the structure from here, below both,
so that a score and a bit always meet under the same name and a model one of them refuses the other
refuses too. Names are timm module paths (``layers.i.blocks.j.attn.qkv``, ...); the two attention
matmuls are named under the attention module that performs them (``...attn.matmul1``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, cast

from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock
from torch import nn

from .plan.sites import Site

# The sites of one block, in forward order.
BLOCK_SITES = ('attn.qkv', 'attn.matmul1', 'attn.matmul2', 'attn.proj', 'mlp.fc1', 'mlp.fc2')


def check_swin(model: nn.Module) -> None:
    """Fail early, saying why, on a model whose computation the explicit forward does not cover."""
    if not isinstance(model, SwinTransformer):
        raise TypeError(f'LRP needs a timm SwinTransformer, got {type(model).__name__}')
    if model.global_pool != 'avg' or not isinstance(model.head.fc, nn.Linear):
        raise ValueError(
            f"LRP needs the average-pool + Linear classifier head (global_pool='avg', "
            f'num_classes > 0); got global_pool={model.global_pool!r}, '
            f'head.fc={type(model.head.fc).__name__}'
        )
    for name, unit in swin_units(model):
        if isinstance(unit, SwinTransformerBlock):
            mlp = unit.mlp
            if not (hasattr(mlp, 'fc1') and hasattr(mlp, 'fc2') and isinstance(mlp.norm, nn.Identity)):
                raise ValueError(f'{name}.mlp: only timm Mlp (fc1 -> act -> fc2) is supported')


def swin_units(model: SwinTransformer) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every patch merging and block, in forward order."""
    for i, stage in enumerate(cast(Iterable[Any], model.layers)):
        if isinstance(stage.downsample, PatchMerging):
            yield f'layers.{i}.downsample', stage.downsample
        for j, block in enumerate(cast(Iterable[Any], stage.blocks)):
            yield f'layers.{i}.blocks.{j}', block


def unit_sites(unit_name: str) -> list[str]:
    """The site names of the unit called ``unit_name``, in forward order."""
    if unit_name.endswith('downsample'):
        return [f'{unit_name}.reduction']
    return [f'{unit_name}.{s}' for s in BLOCK_SITES]


def swin_site_layout(model: SwinTransformer) -> list[Site]:
    """The sites LRP scores (all but the patch embedding) in forward order, with their params.

    ``block`` is the global block index; patch merging has ``block=None`` and the *timm* stage it
    opens (mmdet puts it at the end of stage ``i - 1``). MACs are left at 0: they depend on the input.
    """
    check_swin(model)
    sites: list[Site] = []
    block = 0
    for unit_name, unit in swin_units(model):
        stage = int(unit_name.split('.')[1])
        if isinstance(unit, PatchMerging):
            name = unit_sites(unit_name)[0]
            sites.append(Site(name, 'linear', 'reduction', None, stage, params=unit.reduction.weight.numel()))
            continue
        for name, suffix in zip(unit_sites(unit_name), BLOCK_SITES):
            layer_type = suffix.rsplit('.', 1)[-1]
            if layer_type.startswith('matmul'):
                sites.append(Site(name, 'matmul', layer_type, block, stage))
            else:
                params = cast(nn.Linear, unit.get_submodule(suffix)).weight.numel()
                sites.append(Site(name, 'linear', layer_type, block, stage, params))
        block += 1
    return sites


__all__ = ['BLOCK_SITES', 'check_swin', 'swin_units', 'unit_sites', 'swin_site_layout']
