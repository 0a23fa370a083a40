"""Quantization sites of MMDetection's ``SwinTransformer`` (docs/method.md).

Sites, in forward order: the patch-embedding conv, and per block ``qkv``, ``matmul1`` (q·kᵀ),
``matmul2`` (attn·v, post-softmax operand on the log-√2 quantizer), ``proj``, ``fc1``
(``ffn.layers.0.0``), ``fc2`` (``ffn.layers.1``); per stage the patch-merging ``reduction``.
The inputs of ``qkv``, ``fc1`` and ``reduction`` follow a LayerNorm and are calibrated per
channel, then reparameterized into ``norm1``, ``norm2``, ``downsample.norm`` (RepQ/CRL).

``WindowMSA`` computes both attention matmuls inline, so its class is swapped for
:class:`QuantWindowMSA`, whose forward performs the same operations in the same order with the
two matmuls as :class:`~mmdet_lrpq.quant.QuantMatMul` modules: in the FLOAT state it is
bit-identical to stock mmdet.

Padding subtlety: ``ShiftWindowMSA`` zero-pads the *output* of ``norm1`` to whole windows, and
the padded tokens take part in attention. After reparameterization ``norm1`` emits
``x/r - b``, where a zero is no longer a zero. So for the ``norm1 -> qkv`` pair the shift ``-b``
is applied inside :class:`QuantWindowMSA` (after padding, before ``qkv``'s quantizer) instead
of in ``norm1``'s bias; padded tokens then still stand for zeros and the reparameterized block
equals the original one at any image size.
"""

from __future__ import annotations

from mmdet.models.backbones.swin import SwinTransformer, WindowMSA
from torch import Tensor, nn

from ..plan.sites import Site
from ..quant.reconstruct_units import Unit
from .base import QuantWindowAttentionMixin, ReparamPair, SwinFamilyAdapter
from .swin_names import swin_architecture


class QuantWindowMSA(QuantWindowAttentionMixin, WindowMSA):
    """mmdet ``WindowMSA`` with ``q@kᵀ`` and ``attn@v`` routed through ``QuantMatMul`` modules."""

    def _get_rel_pos_bias(self) -> Tensor:
        area = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(area, area, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)


class SwinAdapter(SwinFamilyAdapter):
    """Where the quantization sites of an mmdet ``SwinTransformer`` are."""

    family = 'mmdet SwinTransformer'
    swin = SwinTransformer
    attention = QuantWindowMSA

    def blocks(self):
        """(stage index, global block index, block path, block) in forward order."""
        g = 0
        for s, stage in enumerate(self.module.stages):
            for j, block in enumerate(stage.blocks):
                yield s, g, f'{self.prefix}stages.{s}.blocks.{j}', block
                g += 1

    def sites(self) -> list[Site]:
        def linear(name: str, module: nn.Module, layer_type: str, block=None, stage=None, kind='linear') -> Site:
            return Site(name, kind, layer_type, block, stage, params=module.weight.numel())

        pre = self.prefix
        out = [linear(f'{pre}patch_embed.projection', self.module.patch_embed.projection, 'patch_embed', kind='conv')]
        for s, g, p, block in self.blocks():
            msa = block.attn.w_msa
            out += [
                linear(f'{p}.attn.w_msa.qkv', msa.qkv, 'qkv', g, s),
                Site(f'{p}.attn.w_msa.matmul1', 'matmul', 'matmul1', g, s),
                Site(f'{p}.attn.w_msa.matmul2', 'matmul', 'matmul2', g, s),
                linear(f'{p}.attn.w_msa.proj', msa.proj, 'proj', g, s),
                linear(f'{p}.ffn.layers.0.0', block.ffn.layers[0][0], 'fc1', g, s),
                linear(f'{p}.ffn.layers.1', block.ffn.layers[1], 'fc2', g, s),
            ]
            stage = self.module.stages[s]
            if block is stage.blocks[-1] and stage.downsample is not None:
                out.append(
                    linear(f'{pre}stages.{s}.downsample.reduction', stage.downsample.reduction, 'reduction', None, s)
                )
        return out

    def reparam_pairs(self) -> list[ReparamPair]:
        pairs = []
        for s, _, p, block in self.blocks():
            pairs.append(ReparamPair(f'{p}.norm1', f'{p}.attn.w_msa.qkv', shift_owner=f'{p}.attn.w_msa'))
            pairs.append(ReparamPair(f'{p}.norm2', f'{p}.ffn.layers.0.0'))
            stage = self.module.stages[s]
            if block is stage.blocks[-1] and stage.downsample is not None:
                pairs.append(
                    ReparamPair(
                        f'{self.prefix}stages.{s}.downsample.norm', f'{self.prefix}stages.{s}.downsample.reduction'
                    )
                )
        return pairs

    def output_norms(self) -> dict[int, str]:
        return {i: f'{self.prefix}norm{i}' for i in self.module.out_indices}

    def units(self) -> list[Unit]:
        """Patch embedding, every block, every patch merging; the state is ``(tokens, hw_shape)``."""
        swin = self.module

        def embed(x):
            x, hw_shape = swin.patch_embed(x)
            if swin.use_abs_pos_embed:
                x = x + swin.absolute_pos_embed
            return swin.drop_after_pos(x), hw_shape

        out = [Unit(f'{self.prefix}patch_embed', swin.patch_embed, embed)]
        for s, stage in enumerate(swin.stages):
            for j, block in enumerate(stage.blocks):
                out.append(
                    Unit(
                        f'{self.prefix}stages.{s}.blocks.{j}',
                        block,
                        lambda x, hw_shape, block=block: (block(x, hw_shape), hw_shape),
                    )
                )
            if stage.downsample is not None:
                out.append(Unit(f'{self.prefix}stages.{s}.downsample', stage.downsample, stage.downsample))
        return out

    def architecture(self) -> dict:
        swin = self.module
        first = [stage.blocks[0] for stage in swin.stages]
        embed = swin.patch_embed.projection
        return swin_architecture(
            embed.out_channels,
            [len(stage.blocks) for stage in swin.stages],
            [b.attn.w_msa.num_heads for b in first],
            first[0].attn.w_msa.window_size[0],
            embed.kernel_size[0],
            first[0].ffn.layers[0][0].out_features / first[0].ffn.layers[0][0].in_features,
        )

    def window_attentions(self):
        for _, _, p, block in self.blocks():
            yield f'{p}.attn.w_msa', block.attn.w_msa
