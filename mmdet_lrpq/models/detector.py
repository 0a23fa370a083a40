"""Quantize an MMDetection detector: sites, bit plan, wrapping, calibration, reparameterization.

This is the one implementation behind both the ``QuantizationHook`` (config: ``custom_hooks``)
and the ``QuantSwinTransformer`` backbone type (config: ``backbone=dict(type=...)``).

Protocol (RepQ-ViT, DESIGN §3.1/§3.6): every Conv2d/Linear of the detector (``scope='detector'``)
or of the backbone only (``scope='backbone'``) is quantized — weights per output channel,
inputs per tensor — plus both attention matmuls of every Swin window attention; the
patch-embedding input stays at 8 bits; post-LayerNorm inputs (qkv, fc1, reduction) are
calibrated per channel and reparameterized (RepQ, or CRL with clipping ``k``). Order: wrap ->
calibrate -> reparameterize -> (weights requantize themselves) -> evaluate.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..plan import BitPlan, Site, account
from ..quant import (LayerQuantConfig, QuantConv2d, QuantLinear, QuantState, calibrate,
                     quant_modules, quantizable_layers, reparameterize_, set_quant_state, wrap_modules)
from ..quant.macs import count_macs
from .mmdet_swin import ReparamPair, SwinAdapter, apply_reparam_shift

ADAPTERS = (SwinAdapter,)     # one adapter per backbone family; first isinstance match wins
METHODS = ('repq', 'crl', 'none')
SCOPES = ('detector', 'backbone')
DEFAULT_CRL_K = 3.0


@dataclass
class QuantSettings:
    """User-facing options (the hook's and the backbone type's keyword arguments)."""
    w_bits: int = 4
    a_bits: int = 4
    plan: Optional[str] = None                  # BitPlan JSON; takes precedence over w_bits/a_bits
    method: str = 'crl'                         # 'repq' | 'crl' | 'none'
    crl_k: float = DEFAULT_CRL_K                # CRL clipping, standard deviations (inf = RepQ)
    scope: str = 'detector'                     # 'detector' (RepQ protocol) | 'backbone'
    round_zero_point: bool = False              # RepQ-ViT leaves the layer-wise zero point fractional
    patch_embed_a_bits: Optional[int] = 8       # RepQ-ViT keeps the image input at 8 bits; None: plan
    reparam_output_norms: Optional[bool] = None  # backbone out norms -> FPN laterals (default: crl)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        LayerQuantConfig(self.w_bits, self.a_bits)   # range check with the shared message
        if self.patch_embed_a_bits is not None:
            LayerQuantConfig(8, self.patch_embed_a_bits)
        self.crl_k = float(self.crl_k)
        if not self.crl_k > 0:
            raise ValueError(f'crl_k must be > 0 standard deviations (inf for RepQ), got {self.crl_k}')
        if self.reparam_output_norms is None:
            self.reparam_output_norms = self.method == 'crl'
        if self.plan is not None and not os.path.isfile(self.plan):
            raise FileNotFoundError(f'bit plan not found: {self.plan}. It is not made silently uniform; '
                                    f'make it with: {plan_command(self.plan)}')

    @property
    def k(self) -> float:
        """The clipping actually applied: CRL's k, or infinity (RepQ)."""
        return self.crl_k if self.method == 'crl' else math.inf

    def describe(self) -> dict:
        return {**asdict(self), 'crl_k': self.crl_k if math.isfinite(self.crl_k) else 'inf'}

    def load_plan(self) -> BitPlan:
        if self.plan is None:
            return BitPlan.uniform(self.w_bits, self.a_bits)
        return BitPlan.load(self.plan)


@dataclass
class QuantizationResult:
    """What was done, for the log table, the report file and the tests."""
    sites: list[Site]
    bits: dict[str, tuple[int, int]]
    granularity: dict[str, str]
    reparameterized: dict[str, str] = field(default_factory=dict)
    calibration_ids: list[Any] = field(default_factory=list)
    input_shape: Optional[tuple[int, int]] = None

    def totals(self) -> dict:
        acc = account(self.sites, self.bits)
        n_layers = sum(s.kind != 'matmul' for s in self.sites)
        return {'conv_linear': n_layers, 'matmul': len(self.sites) - n_layers, **acc.to_dict()}


def plan_command(path: str) -> str:
    """The tools/lrp_plan.py command that makes the plan ``path`` (from its name, when standard)."""
    m = re.search(r'swin_([ts])_mp(\d)', os.path.basename(path))
    model = {'t': 'swin_tiny_patch4_window7_224', 's': 'swin_small_patch4_window7_224'}[m.group(1)] if m else 'MODEL'
    target = f'mp{m.group(2)}' if m else 'mpK'
    return (f'python tools/lrp_plan.py --model {model} --checkpoint CLASSIFIER.pth --images IMAGENET_DIR '
            f'--target {target} --out {path}   (see configs/plans/README.md)')


def find_adapter(backbone: Optional[nn.Module]):
    for cls in ADAPTERS:
        if backbone is not None and isinstance(backbone, cls.backbone_type):
            return cls(backbone)
    return None


class DetectorQuantizer:
    """Drives the quantization of one detector instance (see module docstring)."""

    def __init__(self, model: nn.Module, settings: QuantSettings, logger: Optional[logging.Logger] = None):
        self.model = model
        self.settings = settings
        self.logger = logger or logging.getLogger('mmdet_lrpq')
        self.backbone = getattr(model, 'backbone', None)
        self.adapter = find_adapter(self.backbone)
        if self.adapter is None:
            kind = type(self.backbone).__name__ if self.backbone is not None else 'no backbone'
            if settings.scope == 'backbone':
                raise TypeError(f"scope='backbone' needs a backbone with an adapter "
                                f"({', '.join(a.backbone_type.__name__ for a in ADAPTERS)}); this model has "
                                f"{kind}. Use scope='detector' for the generic Conv2d/Linear treatment.")
            self.logger.warning(f'{kind} has no quantization adapter: its Conv2d/Linear layers are quantized '
                                f'generically (no attention matmuls, no LayerNorm reparameterization)')
        self.pairs = self._reparam_pairs()
        self.result: Optional[QuantizationResult] = None

    # ------------------------------------------------------------------ sites
    def _backbone_prefix(self) -> str:
        return 'backbone.'

    def sites(self) -> list[Site]:
        """Every site in scope, backbone first, then the rest of the detector in module order."""
        sites: list[Site] = []
        covered: set[str] = set()
        if self.adapter is not None:
            pre = self._backbone_prefix()
            for s in self.adapter.sites():
                sites.append(Site(pre + s.name, s.kind, s.layer_type, s.block, s.stage, s.params, s.macs))
            covered = {s.name for s in sites}
        for name, layer in quantizable_layers(self.model).items():
            in_backbone = name.startswith(self._backbone_prefix())
            if name in covered or (self.settings.scope == 'backbone' and not in_backbone):
                continue
            kind = 'conv' if isinstance(layer, nn.Conv2d) else 'linear'
            sites.append(Site(name, kind, 'other', params=layer.weight.numel()))
        return sites

    def _reparam_pairs(self) -> list[ReparamPair]:
        if self.adapter is None or self.settings.method == 'none':
            return []
        pre = self._backbone_prefix()
        pairs = [ReparamPair(pre + p.norm, pre + p.layer, p.shift_owner and pre + p.shift_owner)
                 for p in self.adapter.reparam_pairs()]
        if self.settings.reparam_output_norms and self.settings.scope == 'detector':
            pairs += self._neck_pairs()
        return pairs

    def _neck_pairs(self) -> list[ReparamPair]:
        """Backbone output norms -> FPN lateral 1x1 convs, where the output feeds nothing else."""
        neck = getattr(self.model, 'neck', None)
        laterals = getattr(neck, 'lateral_convs', None)
        if laterals is None or not hasattr(neck, 'start_level'):
            return []
        pairs = []
        # FPN input p is the backbone's p-th output, i.e. out_indices[p], whatever stage that is.
        for p, (out_idx, norm) in enumerate(sorted(self.adapter.output_norms().items())):
            j = p - neck.start_level
            if not 0 <= j < len(laterals):
                continue
            shared = neck.add_extra_convs == 'on_input' and p == neck.backbone_end_level - 1
            conv = getattr(laterals[j], 'conv', None)
            if shared or not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1) or conv.groups != 1:
                continue
            pairs.append(ReparamPair(self._backbone_prefix() + norm, f'neck.lateral_convs.{j}.conv'))
        return pairs

    # ------------------------------------------------------------------ wrap
    def resolve_bits(self, sites: list[Site]) -> dict[str, tuple[int, int]]:
        plan = self.settings.load_plan()
        plan.validate(sites)
        bits = plan.resolve([s.name for s in sites])
        pe = self._backbone_prefix() + 'patch_embed.projection'
        if self.settings.patch_embed_a_bits is not None and pe in bits:
            bits[pe] = (bits[pe][0], self.settings.patch_embed_a_bits)
        return bits

    def wrap(self) -> QuantizationResult:
        """Swap every site for its fake-quant module (FLOAT state: outputs unchanged)."""
        if quant_modules(self.model):
            raise RuntimeError('this model is already quantized; build a fresh one to quantize again')
        sites = self.sites()
        bits = self.resolve_bits(sites)
        per_channel = {p.layer for p in self.pairs}
        layer_names = {s.name for s in sites if s.kind != 'matmul'}
        wrap_modules(self.model, lambda name, m: LayerQuantConfig(*bits[name], per_channel_input=name in per_channel)
                     if name in layer_names else None)
        if self.adapter is not None:
            pre = self._backbone_prefix()
            self.adapter.convert_attention_({n[len(pre):]: bits[n][1] for n in bits if n.endswith(('matmul1', 'matmul2'))})
        granularity = {}
        for s in sites:
            if s.kind == 'matmul':
                granularity[s.name] = 'log√2 · uniform' if s.layer_type == 'matmul2' else 'uniform · uniform'
            else:
                granularity[s.name] = 'w:channel a:' + ('channel' if s.name in per_channel else 'tensor')
        self.result = QuantizationResult(sites, bits, granularity)
        return self.result

    # ------------------------------------------------------------------ calibrate + reparam
    def calibrate(self, forward: Callable[[nn.Module], Any], image_ids: Optional[list] = None,
                  input_shape: Optional[tuple[int, int]] = None, n_images: int = 1) -> None:
        """One forward over the calibration batch, then reparameterization (RepQ/CRL)."""
        if self.result is None:
            self.wrap()
        with count_macs(self.model) as macs:
            calibrate(self.model, forward)
        self.result.sites = [Site(s.name, s.kind, s.layer_type, s.block, s.stage, s.params,
                                  macs.get(s.name, 0) // max(1, n_images)) for s in self.result.sites]
        self.result.calibration_ids = list(image_ids or [])
        self.result.input_shape = input_shape
        self.reparameterize()
        self.requantize_weights()

    def requantize_weights(self) -> None:
        """Re-calibrate and cache every weight quantizer now (reparameterization changed weights)."""
        for m in quant_modules(self.model).values():
            if isinstance(m, (QuantConv2d, QuantLinear)):
                m.quantized_weight()

    def reparameterize(self) -> None:
        modules = dict(self.model.named_modules())
        tag = f'crl(k={self.settings.crl_k:g})' if self.settings.method == 'crl' else 'repq'
        for pair in self.pairs:
            norm, layer = modules[pair.norm], modules[pair.layer]
            res = reparameterize_(norm, layer, k=self.settings.k, round_zero_point=self.settings.round_zero_point)
            if pair.shift_owner is not None:
                apply_reparam_shift(modules[pair.shift_owner], norm, res)
            self.result.reparameterized[pair.layer] = tag
            self.result.granularity[pair.layer] = 'w:channel a:channel→tensor'

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        """Everything needed to restore the calibrated model without recalibrating."""
        return {'format': 'mmdet-lrpq/quant-state@1', 'settings': self.settings.describe(),
                'state_dict': {k: v.detach().cpu() if torch.is_tensor(v) else v
                               for k, v in self.model.state_dict().items()},
                'calibration_ids': self.result.calibration_ids, 'input_shape': self.result.input_shape,
                'sites': [s.to_dict() for s in self.result.sites],
                'reparameterized': self.result.reparameterized}

    def load_state(self, state: dict) -> None:
        if state.get('format') != 'mmdet-lrpq/quant-state@1':
            raise ValueError('not an mmdet-lrpq calibrated-state file (missing format mmdet-lrpq/quant-state@1)')
        if state['settings'] != self.settings.describe():
            diff = {k: (state['settings'].get(k), v) for k, v in self.settings.describe().items()
                    if state['settings'].get(k) != v}
            raise ValueError(f'the calibrated state was made with different settings {diff} (saved, now); '
                             f'delete the state file to recalibrate, or use the settings it was made with')
        if self.result is None:
            self.wrap()
        missing, unexpected = self.model.load_state_dict(state['state_dict'], strict=False)
        if missing or unexpected:
            raise ValueError(f'calibrated state does not fit this model: {len(missing)} missing, '
                             f'{len(unexpected)} unexpected tensors (e.g. {(missing + unexpected)[:3]})')
        set_quant_state(self.model, QuantState.QUANTIZED)
        self.result.sites = [Site(**s) for s in state['sites']]
        self.result.calibration_ids = state['calibration_ids']
        self.result.input_shape = state['input_shape'] and tuple(state['input_shape'])
        self.result.reparameterized = state['reparameterized']
        for name in self.result.reparameterized:
            self.result.granularity[name] = 'w:channel a:channel→tensor'

    # ------------------------------------------------------------------ report
    def table(self) -> str:
        r = self.result
        rows = [('site', 'kind', 'W', 'A', 'granularity', 'reparam')]
        for s in r.sites:
            w, a = r.bits[s.name]
            rows.append((s.name, s.kind, '-' if s.kind == 'matmul' else str(w), str(a),
                         r.granularity[s.name], r.reparameterized.get(s.name, '-')))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ['  '.join(c.ljust(wd) for c, wd in zip(row, widths)) for row in rows]
        lines.insert(1, '  '.join('-' * wd for wd in widths))
        t = r.totals()
        shape = f' at {r.input_shape[1]}x{r.input_shape[0]}' if r.input_shape else ''
        lines.append(
            f"scope={self.settings.scope} method={self.settings.method}"
            f"{'(k=%g)' % self.settings.crl_k if self.settings.method == 'crl' else ''}: "
            f"{t['conv_linear']} Conv2d/Linear + {t['matmul']} attention matmuls quantized; "
            f"avg W bits {t['avg_weight_bits']:.3f}, avg A bits {t['avg_act_bits']:.3f} "
            f"(MAC-weighted {t['avg_act_bits_mac_weighted']:.3f}), weights {t['weight_mb']:.2f} MB, "
            f"{t['bops'] / 1e9:.2f} GBOPs/image{shape}; calibration images: {r.calibration_ids}")
        return '\n'.join(lines)

    def report(self) -> dict:
        r = self.result
        return {'settings': self.settings.describe(), 'totals': r.totals(), 'calibration_ids': r.calibration_ids,
                'input_shape': r.input_shape,
                'sites': [{**s.to_dict(), 'w_bits': r.bits[s.name][0], 'a_bits': r.bits[s.name][1],
                           'granularity': r.granularity[s.name], 'reparam': r.reparameterized.get(s.name)}
                          for s in r.sites]}


def quantized_layer_count(model: nn.Module) -> dict[str, int]:
    mods = quant_modules(model)
    return {'conv_linear': sum(isinstance(m, (QuantConv2d, QuantLinear)) for m in mods.values()),
            'matmul': sum(not isinstance(m, (QuantConv2d, QuantLinear)) for m in mods.values())}


__all__ = ['QuantSettings', 'QuantizationResult', 'DetectorQuantizer', 'find_adapter', 'ADAPTERS',
           'quantized_layer_count']
