"""Quantization sites of timm's ``SwinTransformer`` (the classifier LRP plans are computed on).

The same sites as mmdet's Swin (docs/method.md), named by timm's module paths
(``layers.i.blocks.j.attn.qkv``, ``mlp.fc1``, patch merging ``layers.i.downsample`` at the start of
stage ``i``). In bit plans they go by their mmdet names (``backbone.stages...``, the mapping of
:mod:`.swin_names`), so the plan ``tools/lrp_plan.py`` writes for a detector can be checked on the
classifier it was computed on. The head's Linear is quantized generically. :func:`swin_sites` lists
the sites LRP scores with the MACs a forward measures, for the plans made from those scores.

``WindowAttention`` computes both matmuls inline; its class is swapped for
:class:`QuantWindowAttention`, which runs timm's explicit (non-fused) attention with the matmuls
as :class:`~mmdet_lrpq.quant.QuantMatMul` modules and, like the mmdet adapter, applies the
``-b`` of the ``norm1 -> qkv`` reparameterization after the window padding.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from timm.models.swin_transformer import PatchMerging, SwinTransformer, WindowAttention
from torch import nn

from ..plan.sites import Site
from ..quant import LayerQuantConfig, wrap_modules
from ..quant.macs import count_macs
from ..quant.reconstruct_units import Unit
from ..swin import check_swin, swin_site_layout, swin_units
from .base import QuantWindowAttentionMixin, ReparamPair, SwinFamilyAdapter
from .report import sites_with_macs
from .swin_names import swin_architecture, swin_name_to_mmdet


class QuantWindowAttention(QuantWindowAttentionMixin, WindowAttention):
    """timm ``WindowAttention`` with ``q@kᵀ`` and ``attn@v`` routed through ``QuantMatMul`` modules."""


class TimmSwinAdapter(SwinFamilyAdapter):
    """Where the quantization sites of a timm ``SwinTransformer`` are (its head is generic)."""

    family = 'timm SwinTransformer'
    swin = SwinTransformer
    attention = QuantWindowAttention

    @classmethod
    def supports(cls, module: nn.Module) -> str | None:
        try:
            check_swin(module)
        except (TypeError, ValueError) as err:
            return str(err)
        return None

    def sites(self) -> list[Site]:
        proj = self.module.patch_embed.proj
        pre = self.prefix
        out = [Site(f'{pre}patch_embed.proj', 'conv', 'patch_embed', params=proj.weight.numel())]
        out += [replace(s, name=pre + s.name) for s in swin_site_layout(self.module)]
        return out

    def reparam_pairs(self) -> list[ReparamPair]:
        pairs = []
        for name, unit in swin_units(self.module):
            p = self.prefix + name
            if isinstance(unit, PatchMerging):
                pairs.append(ReparamPair(f'{p}.norm', f'{p}.reduction'))
            else:
                pairs.append(ReparamPair(f'{p}.norm1', f'{p}.attn.qkv', shift_owner=f'{p}.attn'))
                pairs.append(ReparamPair(f'{p}.norm2', f'{p}.mlp.fc1'))
        return pairs

    def units(self) -> list[Unit]:
        """Patch embedding, then per stage its patch merging and blocks; the state is ``(NHWC tokens,)``."""
        out = [Unit(f'{self.prefix}patch_embed', self.module.patch_embed, lambda x: (self.module.patch_embed(x),))]
        out += [Unit(self.prefix + name, unit, lambda x, u=unit: (u(x),)) for name, unit in swin_units(self.module)]
        return out

    def plan_names(self) -> dict[str, str]:
        """Backbone sites by their mmdet names, as ``tools/lrp_plan.py`` writes detector plans."""
        return {s.name: 'backbone.' + swin_name_to_mmdet(s.name[len(self.prefix) :], 'timm') for s in self.sites()}

    def architecture(self) -> dict:
        first = [stage.blocks[0] for stage in self.module.layers]
        proj = self.module.patch_embed.proj
        fc1 = first[0].mlp.fc1
        return swin_architecture(
            proj.out_channels,
            [len(stage.blocks) for stage in self.module.layers],
            [b.attn.num_heads for b in first],
            first[0].window_size[0],
            proj.kernel_size[0],
            fc1.out_features / fc1.in_features,
        )

    def window_attentions(self):
        for name, unit in swin_units(self.module):
            if not isinstance(unit, PatchMerging):
                yield f'{self.prefix}{name}.attn', unit.attn


def swin_sites(model: SwinTransformer) -> list[Site]:
    """The sites LRP scores on a timm Swin (all but the patch embedding), in forward order, with their
    params and their MACs per image at the model's input size (``model.patch_embed.img_size``).

    The MACs are counted as a quantization report counts them (:func:`mmdet_lrpq.quant.macs.count_macs`
    on the wrapped modules of a copy in FLOAT state), so the BOPs a plan is budgeted with are the BOPs
    the report of the quantized model prints, zero-padded windows included.
    """
    layout = swin_site_layout(model)
    work = copy.deepcopy(model).eval()
    adapter = TimmSwinAdapter(work, '')
    layers = adapter.wrapped_layers()
    wrap_modules(work, lambda name, _: LayerQuantConfig() if name in layers else None)
    adapter.convert_({s.name: (8, 8) for s in adapter.sites() if s.kind == 'matmul'})
    proj = work.patch_embed.proj
    image = proj.weight.new_zeros(1, proj.in_channels, *model.patch_embed.img_size)
    with torch.no_grad(), count_macs(work) as macs:
        work(image)
    return sites_with_macs(layout, macs, 1)
