"""Quantized ``nn.MultiheadAttention`` (the decoders of DETR-style detectors: DINO, Mask2Former, ...).

``nn.MultiheadAttention`` hands its weights to ``F.multi_head_attention_forward`` and never runs
its ``out_proj`` module, so a generic Linear wrapper would claim a quantization that does not
happen. Here the module's class is swapped for :class:`QuantMultiheadAttention`, whose forward
performs the same computation as PyTorch's explicit (``need_weights``) path with every product
exposed: the packed input projection (per-output-channel weights, one per-tensor input quantizer
each for query, key and value), ``q@kᵀ`` and ``attn@v`` (post-softmax operand on the log-√2
quantizer) as :class:`~mmdet_lrpq.quant.QuantMatMul`, and ``out_proj`` as a ``QuantLinear``.
Parameters and state-dict keys are unchanged. Configurations outside that path (separate
q/k/v projection weights, ``bias_k``/``bias_v``, ``add_zero_attn``) stay float and are reported.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..plan.sites import Site
from ..quant import QuantLinear, QuantMatMul, QuantModule, QuantState, UniformQuantizer
from ..quant.modules import WeightCache, _Quantizer
from .base import Adapter, Bits


class QuantInProjection(QuantModule):
    """The packed q/k/v projection of a MultiheadAttention: weights from the owner, inputs quantized here."""

    def __init__(self, w_bits: int, a_bits: int):
        super().__init__()
        self.weight_quantizer = UniformQuantizer(w_bits, channel_axis=0)
        self.query_quantizer = UniformQuantizer(a_bits)
        self.key_quantizer = UniformQuantizer(a_bits)
        self.value_quantizer = UniformQuantizer(a_bits)
        self.state = QuantState.FLOAT
        self._weight_cache = WeightCache()

    def input_quantizers(self) -> list[_Quantizer]:
        return [self.query_quantizer, self.key_quantizer, self.value_quantizer]

    def macs(self, inputs: tuple, output: tuple) -> int:
        """Multiply-accumulates of the three projections (for BOPs): outputs x input features."""
        return sum(o.numel() * x.shape[-1] for o, x in zip(output, inputs[:3]))

    def _weight(self, weight: Tensor) -> Tensor:
        return weight if self.state is QuantState.FLOAT else self._weight_cache(self.weight_quantizer, weight)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, weight: Tensor, bias: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        w = self._weight(weight).chunk(3)
        b = bias.chunk(3) if bias is not None else (None, None, None)
        out = []
        for x, quantizer, wi, bi in zip((query, key, value), self.input_quantizers(), w, b):
            if self.state is not QuantState.FLOAT:
                x = self._quantize_input(quantizer, x)
            out.append(F.linear(x, wi, bi))  # consumed before the next input reuses the scratch slot
        return out[0], out[1], out[2]


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """PyTorch's mask convention: a boolean mask marks positions to drop (-inf), a float one is added."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float('-inf'))
    return mask.to(dtype)


class QuantMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with its products routed through quantized modules (see module doc)."""

    in_proj: QuantInProjection
    matmul1: QuantMatMul
    matmul2: QuantMatMul

    @classmethod
    def convert_(
        cls, mha: nn.MultiheadAttention, in_bits: Bits, bits1: int, bits2: int, out_bits: Bits
    ) -> QuantMultiheadAttention:
        mha.__class__ = cls
        mha.in_proj = QuantInProjection(*in_bits)
        mha.matmul1 = QuantMatMul(a_bits=bits1)
        mha.matmul2 = QuantMatMul(a_bits=bits2, log_sqrt2_a=True)
        mha.out_proj = QuantLinear.from_float(mha.out_proj, w_bits=out_bits[0], a_bits=out_bits[1])
        return mha

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError('is_causal needs attn_mask (as in nn.MultiheadAttention)')
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        heads, head_dim = self.num_heads, embed_dim // self.num_heads

        mask = _additive_mask(attn_mask, query.dtype)
        if mask is not None and mask.dim() == 2:
            mask = mask.unsqueeze(0)
        padding = _additive_mask(key_padding_mask, query.dtype)
        if padding is not None:
            padding = padding.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len)
            mask = padding if mask is None else mask + padding

        q, k, v = self.in_proj(query, key, value, self.in_proj_weight, self.in_proj_bias)
        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.reshape(src_len, bsz * heads, head_dim).transpose(0, 1)
        v = v.reshape(src_len, bsz * heads, head_dim).transpose(0, 1)
        scores = self.matmul1(q * math.sqrt(1.0 / float(head_dim)), k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        attn = F.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, p=self.dropout)
        out = self.matmul2(attn, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        out = self.out_proj(out).view(tgt_len, bsz, embed_dim)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights


class MultiheadAttentionAdapter(Adapter):
    """Sites of one ``nn.MultiheadAttention``: in_proj, matmul1, matmul2, out_proj."""

    family = 'nn.MultiheadAttention'
    claims_subtree = True

    @classmethod
    def module_types(cls) -> tuple[type, ...]:
        return (nn.MultiheadAttention,)

    @classmethod
    def supports(cls, module: nn.Module) -> str | None:
        if not module._qkv_same_embed_dim:
            return 'separate q/k/v projection weights (kdim or vdim differs from embed_dim)'
        if module.bias_k is not None or module.bias_v is not None:
            return 'bias_k / bias_v'
        if module.add_zero_attn:
            return 'add_zero_attn'
        return None

    def sites(self) -> list[Site]:
        p, m = self.prefix, self.module
        return [
            Site(f'{p}in_proj', 'linear', 'other', params=m.in_proj_weight.numel()),
            Site(f'{p}matmul1', 'matmul', 'matmul1'),
            Site(f'{p}matmul2', 'matmul', 'matmul2'),
            Site(f'{p}out_proj', 'linear', 'other', params=m.out_proj.weight.numel()),
        ]

    def wrapped_layers(self) -> set[str]:
        return set()  # out_proj is swapped by convert_ (its forward only runs in the quantized module)

    def convert_(self, bits: dict[str, Bits]) -> None:
        p = self.prefix
        QuantMultiheadAttention.convert_(
            self.module, bits[f'{p}in_proj'], bits[f'{p}matmul1'][1], bits[f'{p}matmul2'][1], bits[f'{p}out_proj']
        )
