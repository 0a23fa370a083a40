"""The adapter protocol: what the quantization driver needs to know about one family of modules.

An *adapter* knows one module family — mmdet's Swin, timm's Swin, ``nn.MultiheadAttention`` —
found at some path of a model, and answers: which quantization sites it has (in forward order),
which of them are plain Conv2d/Linear layers the generic wrapper swaps, which LayerNorm -> Linear
pairs can be reparameterized, how to turn its inline matmuls into quantized modules, what its
sites are called in bit plans, and which architecture it is (so a plan made for another size is
refused). Everything the adapters do not cover is quantized generically (Conv2d/Linear).

Families are looked up lazily: an adapter module is imported only when the library that defines
its module type is already loaded (a model containing an mmdet Swin has imported mmdet), so
quantizing a timm or plain PyTorch model never imports MMDetection.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..bits import Bits
from ..plan.sites import Site
from ..quant import QuantMatMul, ReparamResult, SmoothResult
from ..quant.reconstruct_units import Unit


@dataclass(frozen=True)
class ReparamPair:
    """A LayerNorm feeding a quantized layer whose input is calibrated per channel (model paths)."""

    norm: str
    layer: str
    shift_owner: str | None = None  # module that applies -b after window padding (norm1 -> qkv)


class Adapter:
    """Base of the family adapters; ``module`` sits at ``prefix`` (``''`` or ``'backbone.'``) of the model."""

    family: ClassVar[str] = ''
    is_backbone: ClassVar[bool] = False  # covered by scope='backbone'
    claims_subtree: ClassVar[bool] = False  # no Conv2d/Linear below it is quantized generically

    def __init__(self, module: nn.Module, prefix: str):
        self.module = module
        self.prefix = prefix

    @classmethod
    def module_types(cls) -> tuple[type, ...]:
        raise NotImplementedError

    @classmethod
    def supports(cls, module: nn.Module) -> str | None:
        """``None`` if the adapter can quantize ``module``, else why not (it then stays float)."""
        return None

    def sites(self) -> list[Site]:
        """Every site, named by model path, in forward order (MACs are measured later)."""
        raise NotImplementedError

    def wrapped_layers(self) -> set[str]:
        """Model paths of the sites that are plain Conv2d/Linear modules (swapped generically)."""
        return {s.name for s in self.sites() if s.kind != 'matmul'}

    def reparam_pairs(self) -> list[ReparamPair]:
        return []

    def convert_(self, bits: dict[str, Bits]) -> None:
        """Turn what the generic wrapper cannot reach (inline matmuls, fused projections) quantized."""

    def plan_names(self) -> dict[str, str]:
        """Site path -> its name in bit plans (identity unless the family is named otherwise there)."""
        return {s.name: s.name for s in self.sites()}

    def architecture(self) -> dict[str, Any] | None:
        return None

    def output_norms(self) -> dict[int, str]:
        """Backbone output index -> model path of the LayerNorm producing it (for neck pairings)."""
        return {}

    def units(self) -> list[Unit]:
        """The chain of blocks reconstruction learns whole, in forward order (none: its layers are
        reconstructed one by one)."""
        return []


class QuantWindowAttentionMixin:
    """Shared by the Swin families' window attentions: ``q@kᵀ`` and ``attn@v`` as ``QuantMatMul``
    modules and the ``input_shift`` buffer that reparameterizing ``norm1`` into ``qkv`` creates.
    A subclass lists this mixin first, then the family's attention class, and gives the relative
    position bias as ``_get_rel_pos_bias()`` (timm's name for it)."""

    matmul1: QuantMatMul
    matmul2: QuantMatMul
    input_shift: torch.Tensor | None
    qkv: nn.Linear
    proj: nn.Linear
    num_heads: int
    scale: float
    softmax: nn.Module
    attn_drop: nn.Module
    proj_drop: nn.Module
    _get_rel_pos_bias: Callable[[], torch.Tensor]  # declared only: a definition here would hide timm's

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The family's own attention, operation for operation, with the two matmuls quantized: in the
        FLOAT state it is bit-identical to the stock module."""
        if self.input_shift is not None:  # -b of the norm1 -> qkv reparameterization, after the padding
            x = x + self.input_shift
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.matmul1(q * self.scale, k.transpose(-2, -1))
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.softmax(attn))
        x = self.matmul2(attn, v).transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(x))

    @classmethod
    def convert_(cls, attn: nn.Module, bits1: int, bits2: int) -> nn.Module:
        """Turn ``attn`` into ``cls`` in place (parameters and state-dict keys kept)."""
        attn.__class__ = cls
        attn.matmul1 = QuantMatMul(a_bits=bits1)
        attn.matmul2 = QuantMatMul(a_bits=bits2, log_sqrt2_a=True)
        attn.register_buffer('input_shift', None)
        return attn

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a state saved after reparameterization has the shift a freshly converted attention lacks
        if self.input_shift is None and prefix + 'input_shift' in state_dict:
            self.input_shift = torch.empty_like(
                state_dict[prefix + 'input_shift'], device=self.qkv.weight.device, dtype=self.qkv.weight.dtype
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SwinFamilyAdapter(Adapter):
    """What the adapters of both Swin families share: the backbone type ``swin`` is a backbone whose
    window attentions compute their two matmuls inline, so each is turned into ``attention``."""

    is_backbone = True
    swin: ClassVar[type]
    attention: ClassVar[type[QuantWindowAttentionMixin]]

    @classmethod
    def module_types(cls) -> tuple[type, ...]:
        return (cls.swin,)

    def window_attentions(self) -> Iterator[tuple[str, nn.Module]]:
        """(model path, module) of every window attention, in forward order."""
        raise NotImplementedError

    def convert_(self, bits: dict[str, Bits]) -> None:
        """Turn every window attention into ``attention``, with its matmuls at the plan's bits."""
        for path, attn in self.window_attentions():
            self.attention.convert_(attn, bits[f'{path}.matmul1'][1], bits[f'{path}.matmul2'][1])


def site_granularity(site: Site, per_channel: set[str]) -> str:
    """How a site is quantized, for the report (before reparameterization)."""
    if site.kind == 'matmul':
        return 'log√2 · uniform' if site.layer_type == 'matmul2' else 'uniform · uniform'
    return 'w:channel a:' + ('channel' if site.name in per_channel else 'tensor')


# (library module whose presence means the family can occur, adapter module, adapter class)
FAMILIES: tuple[tuple[str, str, str], ...] = (
    ('mmdet.models.backbones.swin', 'mmdet_lrpq.models.mmdet_swin', 'SwinAdapter'),
    ('timm.models.swin_transformer', 'mmdet_lrpq.models.timm_swin', 'TimmSwinAdapter'),
    ('torch.nn', 'mmdet_lrpq.models.attention', 'MultiheadAttentionAdapter'),
)


def active_adapter_classes() -> list[type[Adapter]]:
    """Adapter classes whose library is loaded (importing none that is not)."""
    return [getattr(importlib.import_module(module), cls) for lib, module, cls in FAMILIES if lib in sys.modules]


@dataclass
class Unsupported:
    """A module of a known family that stays float, and why (reported, excluded from the totals)."""

    name: str
    family: str
    reason: str
    params: int


def find_adapters(model: nn.Module) -> tuple[list[Adapter], list[Unsupported]]:
    """Adapters for the outermost family modules of ``model`` in module order, and the unsupported ones."""
    classes = active_adapter_classes()
    found: list[Adapter] = []
    unsupported: list[Unsupported] = []
    claimed: list[str] = []
    for name, module in model.named_modules():
        if any(c == '' or name == c or name.startswith(c + '.') for c in claimed):
            continue
        for cls in classes:
            if isinstance(module, cls.module_types()):
                reason = cls.supports(module)
                prefix = name + '.' if name else ''
                if reason is None:
                    found.append(cls(module, prefix))
                else:
                    unsupported.append(
                        Unsupported(name, cls.family, reason, sum(p.numel() for p in module.parameters()))
                    )
                claimed.append(name)
                break
    return found, unsupported


def apply_reparam_shift(owner: nn.Module, norm: nn.LayerNorm, result: ReparamResult | SmoothResult) -> None:
    """Move the ``-b`` of a norm -> qkv reparameterization from the norm's bias into ``owner``.

    Swin pads the *output* of ``norm1`` to whole windows and the padded tokens take part in
    attention; with ``-b`` in the bias they would no longer stand for zeros. ``owner`` (the
    quantized window attention) adds ``input_shift`` after the padding, before ``qkv``. A second
    fold on the same pair (CRL after SQ-b) divides the earlier shift by its ``r`` and adds its own.
    """
    b = result.b.to(norm.bias.dtype)  # a half-precision model stays in half precision
    with torch.no_grad():
        norm.bias.data = norm.bias.data + b
    earlier = owner.input_shift
    owner.input_shift = -b if earlier is None else earlier / result.r.to(earlier.dtype) - b
