"""Quantization sites of timm's ``SwinTransformer`` (the classifier LRP plans are computed on).

The same sites as mmdet's Swin (DESIGN §3.1), named by timm's module paths
(``layers.i.blocks.j.attn.qkv``, ``mlp.fc1``, patch merging ``layers.i.downsample`` at the start of
stage ``i``). In bit plans they go by their mmdet names (``backbone.stages...``, the mapping of
:mod:`.swin_names`), so the plan ``tools/lrp_plan.py`` writes for a detector can be checked on the
classifier it was computed on. The head's Linear is quantized generically.

``WindowAttention`` computes both matmuls inline; its class is swapped for
:class:`QuantWindowAttention`, which runs timm's explicit (non-fused) attention with the matmuls
as :class:`~mmdet_lrpq.quant.QuantMatMul` modules and, like the mmdet adapter, applies the
``-b`` of the ``norm1 -> qkv`` reparameterization after the window padding.
"""

from __future__ import annotations

from timm.models.swin_transformer import PatchMerging, SwinTransformer, WindowAttention
from torch import Tensor, nn

from ..lrp.scores import swin_sites
from ..lrp.swin import check_swin
from ..plan.sites import Site
from ..quant.reconstruct_units import Unit
from .base import Adapter, Bits, QuantWindowAttentionMixin, ReparamPair
from .swin_names import swin_architecture, swin_name_to_mmdet


class QuantWindowAttention(QuantWindowAttentionMixin, WindowAttention):
    """timm ``WindowAttention`` with ``q@kᵀ`` and ``attn@v`` routed through ``QuantMatMul`` modules."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.input_shift is not None:  # -b of the norm1 -> qkv reparameterization
            x = x + self.input_shift
        B_, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.matmul1(q * self.scale, k.transpose(-2, -1))
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.softmax(attn))
        x = self.matmul2(attn, v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


class TimmSwinAdapter(Adapter):
    """Where the quantization sites of a timm ``SwinTransformer`` are (its head is generic)."""

    family = 'timm SwinTransformer'
    is_backbone = True

    @classmethod
    def module_types(cls) -> tuple[type, ...]:
        return (SwinTransformer,)

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
        out += [Site(pre + s.name, s.kind, s.layer_type, s.block, s.stage, s.params) for s in swin_sites(self.module)]
        return out

    def _blocks(self):
        for i, stage in enumerate(self.module.layers):
            for j, block in enumerate(stage.blocks):
                yield i, f'{self.prefix}layers.{i}.blocks.{j}', block

    def reparam_pairs(self) -> list[ReparamPair]:
        pairs = []
        for i, stage in enumerate(self.module.layers):
            if isinstance(stage.downsample, PatchMerging):
                p = f'{self.prefix}layers.{i}.downsample'
                pairs.append(ReparamPair(f'{p}.norm', f'{p}.reduction'))
            for j in range(len(stage.blocks)):
                p = f'{self.prefix}layers.{i}.blocks.{j}'
                pairs.append(ReparamPair(f'{p}.norm1', f'{p}.attn.qkv', shift_owner=f'{p}.attn'))
                pairs.append(ReparamPair(f'{p}.norm2', f'{p}.mlp.fc1'))
        return pairs

    def units(self) -> list[Unit]:
        """Patch embedding, then per stage its patch merging and blocks; the state is ``(NHWC tokens,)``."""
        out = [Unit(f'{self.prefix}patch_embed', self.module.patch_embed, lambda x: (self.module.patch_embed(x),))]
        for i, stage in enumerate(self.module.layers):
            if isinstance(stage.downsample, PatchMerging):
                out.append(
                    Unit(f'{self.prefix}layers.{i}.downsample', stage.downsample, lambda x, d=stage.downsample: (d(x),))
                )
            for j, block in enumerate(stage.blocks):
                out.append(Unit(f'{self.prefix}layers.{i}.blocks.{j}', block, lambda x, b=block: (b(x),)))
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

    def convert_(self, bits: dict[str, Bits]) -> None:
        for _, p, block in self._blocks():
            QuantWindowAttention.convert_(block.attn, bits[f'{p}.attn.matmul1'][1], bits[f'{p}.attn.matmul2'][1])
