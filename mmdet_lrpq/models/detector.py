"""Detector-level structure of MMDetection's FPN detectors, read from attributes (no mmdet import).

The generic driver (:mod:`.quantizer`) knows no detector: what pairs a backbone's output norms with
the neck, and which heads reconstruction treats as units, is answered here, by structure, for any
model that has ``neck.lateral_convs`` / ``rpn_head`` / ``roi_head`` (Mask R-CNN, Cascade, ...).
A model without them gets nothing from here.
"""

from __future__ import annotations

from torch import nn

from ..quant import quant_modules
from ..quant.reconstruct_units import Unit
from .base import Adapter, ReparamPair


def neck_pairs(model: nn.Module, adapters: list[Adapter]) -> list[ReparamPair]:
    """Backbone output norms -> FPN lateral 1x1 convs, where the output feeds nothing else."""
    neck = getattr(model, 'neck', None)
    laterals = getattr(neck, 'lateral_convs', None)
    backbone = next((a for a in adapters if a.is_backbone and a.prefix == 'backbone.'), None)
    if laterals is None or not hasattr(neck, 'start_level') or backbone is None:
        return []
    pairs = []
    # FPN input p is the backbone's p-th output, i.e. out_indices[p], whatever stage that is.
    for p, (_, norm) in enumerate(sorted(backbone.output_norms().items())):
        j = p - neck.start_level
        if not 0 <= j < len(laterals):
            continue
        shared = neck.add_extra_convs == 'on_input' and p == neck.backbone_end_level - 1
        conv = getattr(laterals[j], 'conv', None)
        if shared or not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1) or conv.groups != 1:
            continue
        pairs.append(ReparamPair(norm, f'neck.lateral_convs.{j}.conv'))
    return pairs


def head_units(model: nn.Module) -> list[Unit]:
    """A detector's heads as reconstruction units, in forward order: the neck and the RPN head
    (their inputs correspond image by image in the float and the quantized model), then every RoI
    box and mask head (their RoIs do not: learned on the quantized model's RoIs, sampled)."""
    out = [
        Unit(name, module, lambda *args, module=module: module(*args))
        for name in ('neck', 'rpn_head')
        if isinstance(module := getattr(model, name, None), nn.Module)
    ]
    roi = getattr(model, 'roi_head', None)
    for attr in ('bbox_head', 'mask_head'):
        heads = getattr(roi, attr, None)
        named = (
            [(f'roi_head.{attr}.{i}', h) for i, h in enumerate(heads)]
            if isinstance(heads, nn.ModuleList)
            else [(f'roi_head.{attr}', heads)]
            if isinstance(heads, nn.Module)
            else []
        )
        out += [Unit(name, h, lambda *args, h=h: h(*args), aligned=False, sample_rows=True) for name, h in named]
    return [u for u in out if quant_modules(u.module)]


__all__ = ['neck_pairs', 'head_units']
