"""The one quantization driver: sites, bit plan, wrapping, calibration, reparameterization, state.

Behind :func:`mmdet_lrpq.quantize_`, the ``QuantizationHook``, ``init_quantized_detector`` and the
``QuantSwinTransformer`` backbone type alike. It works on any ``nn.Module``: architecture
adapters (:mod:`.base`) supply the sites they know (a Swin backbone: attention matmuls,
per-channel post-LayerNorm inputs and their reparameterization; ``nn.MultiheadAttention``: its
packed projection and matmuls), every other Conv2d/Linear is quantized generically, and modules
of a known family that cannot be quantized are reported as float and left out of the totals.

Protocol (RepQ-ViT, docs/method.md): weights per output channel, inputs per tensor, the
patch-embedding input at 8 bits, post-LayerNorm inputs calibrated per channel and
reparameterized (RepQ, or CRL with clipping ``k``). Order: wrap -> calibrate (streamed, see
:mod:`mmdet_lrpq.quant.calibrate`) -> reparameterize -> re-quantize weights -> evaluate.
MPTQ-ViT's options: ``smooth='sq-b'`` folds SQ-b into the same LayerNorm pairs from a float pass
over the calibration images before calibrating; ``gelu_scales='opt-m'`` gives the Swin MLPs' ``fc2``
(post-GELU) inputs the region-wise quantizer at wrapping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..config import QuantConfig, plan_command
from ..plan import Site
from ..quant import (
    CALIBRATION_RULE,
    LayerQuantConfig,
    QuantConv2d,
    QuantLinear,
    QuantState,
    RegionUniformQuantizer,
    calibrate_stream,
    quant_modules,
    quantizable_layers,
    reconstruct_,
    recording_ranges,
    reparameterize_,
    set_quant_state,
    smooth_,
    thin_channel_ranges,
    wrap_modules,
)
from ..quant.macs import count_macs
from .base import Adapter, Bits, ReparamPair, apply_reparam_shift, find_adapters, site_granularity
from .detector import head_units, neck_pairs
from .report import QuantReport, sites_with_macs
from .state import check_identity, load_tensors, make_state, new_identity

# Fewest values per channel a per-channel activation range should rest on before calibration warns.
MIN_VALUES_PER_CHANNEL = 128


def _peak_memory_reset(device: torch.device) -> None:
    """Start a fresh measurement of the calibration's peak GPU memory (PyTorch's allocator statistics).

    The process's resident high-water mark is not touched: resetting it (``/proc/self/clear_refs``)
    would disturb any other profiler of the process; ``bench/calibration_memory.py`` measures RSS."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> dict:
    if device.type == 'cuda':
        return {'peak_cuda_mb': round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
    return {}


def images_in(batch: Any) -> int:
    """Number of images in one calibration input (counted and reported)."""
    if isinstance(batch, Mapping) and 'inputs' in batch:
        return len(batch['inputs'])
    if isinstance(batch, Tensor) and batch.dim() == 4:
        return batch.shape[0]
    return 1


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device('cpu')


class ModelQuantizer:
    """Quantizes one model instance (see module docstring)."""

    def __init__(self, model: nn.Module, config: QuantConfig, logger: logging.Logger | None = None):
        self.model = model
        self.config = config
        self.logger = logger or logging.getLogger('mmdet_lrpq')
        self.adapters, self.unsupported = find_adapters(model)
        backbones = [a for a in self.adapters if a.is_backbone]
        if config.scope == 'backbone' and not backbones:
            from .base import FAMILIES

            raise TypeError(
                f"scope='backbone' needs a backbone with an adapter ({', '.join(c for _, _, c in FAMILIES)}); "
                f"this model has none ({self._backbone_kind()}). Use scope='detector' for the generic "
                f'Conv2d/Linear treatment.'
            )
        if not backbones and hasattr(model, 'backbone'):
            self.logger.warning(
                f'{self._backbone_kind()} has no quantization adapter: its Conv2d/Linear layers are '
                f'quantized generically (no attention matmuls, no LayerNorm reparameterization)'
            )
        for u in self.unsupported:
            self.logger.warning(
                f'{u.name} ({u.family}) stays float: {u.reason}; it is listed as float in the '
                f'report and not counted in its totals'
            )
        norm_pairs = self._norm_pairs()
        self.pairs = [] if config.method == 'none' else norm_pairs
        self.smooth_pairs = norm_pairs if config.smooth is not None else []
        self.report: QuantReport | None = None
        self.identity: dict | None = None  # of the calibrated state (set by calibrate/load_state)
        self._float: dict | None = None

    def _backbone_kind(self) -> str:
        backbone = getattr(self.model, 'backbone', None)
        return type(backbone).__name__ if backbone is not None else type(self.model).__name__

    def _active(self) -> list[Adapter]:
        return [a for a in self.adapters if self.config.scope == 'detector' or a.is_backbone]

    # ------------------------------------------------------------------ sites
    def sites(self) -> list[Site]:
        """Every site in scope, in module order (an adapter's sites where its module sits)."""
        order = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
        groups: list[tuple[int, list[Site]]] = []
        claimed: set[str] = set()
        for a in self.adapters:
            sites = a.sites()
            claimed |= {s.name for s in sites}
            if a in self._active():
                groups.append((order[a.prefix.rstrip('.')], sites))
        roots = [a.prefix.rstrip('.') for a in self.adapters if a.claims_subtree] + [u.name for u in self.unsupported]
        if self.config.scope == 'detector':
            for name, layer in quantizable_layers(self.model).items():
                if name in claimed or any(r == '' or name == r or name.startswith(r + '.') for r in roots):
                    continue
                kind = 'conv' if isinstance(layer, nn.Conv2d) else 'linear'
                groups.append((order[name], [Site(name, kind, 'other', params=layer.weight.numel())]))
        groups.sort(key=lambda g: g[0])
        return [s for _, sites in groups for s in sites]

    def _norm_pairs(self) -> list[ReparamPair]:
        """LayerNorm -> layer pairs whose channels can take a folded scale and shift (RepQ/CRL, SQ-b)."""
        pairs = [p for a in self._active() for p in a.reparam_pairs()]
        if self.config.reparam_output_norms and self.config.scope == 'detector':
            pairs += neck_pairs(self.model, self.adapters)
        return pairs

    # ------------------------------------------------------------------ bits + wrap
    def nothing_to_quantize(self) -> str:
        """Why the model has no site in scope (the message of that error)."""
        floats = (
            f'; {len(self.unsupported)} module(s) of a known family stay float: '
            + ', '.join(f'{u.name} ({u.reason})' for u in self.unsupported[:3])
            if self.unsupported
            else ''
        )
        return (
            f'nothing to quantize in {type(self.model).__name__}: it has no Conv2d or Linear layer and no '
            f'attention of a supported family (scope={self.config.scope!r}){floats}. Quantization covers '
            f'Conv2d/Linear layers (their weights and inputs) and the Swin / nn.MultiheadAttention matmuls.'
        )

    def resolve_bits(self, sites: list[Site]) -> dict[str, Bits]:
        if not sites:
            raise ValueError(self.nothing_to_quantize())
        plan = self.config.load_plan()
        for a in self._active():
            arch = a.architecture()
            if arch is not None:
                plan.check_architecture(arch, where=f'the {a.family} at {a.prefix.rstrip(".") or "the model root"}')
        plan_name = {s.name: s.name for s in sites}
        for a in self._active():
            plan_name.update(a.plan_names())
        names = [plan_name[s.name] for s in sites]
        plan.validate(names)
        resolved = plan.resolve(names)
        bits = {s.name: resolved[plan_name[s.name]] for s in sites}
        for name, a_bits in self.config.pinned_act_bits(sites).items():
            bits[name] = (bits[name][0], a_bits)
        return bits

    def _float_identity(self, calibration: dict | None) -> dict:
        """The identity a state made now would have (fingerprints taken of the float model, once)."""
        if self._float is None:
            if quant_modules(self.model):
                raise RuntimeError('this model is already quantized; build a fresh one to quantize again')
            # the rule that combines calibration batches is part of what a state was made by: a state of
            # the earlier rule (a mean of batch ranges) is refused rather than silently reused
            self._float = new_identity(
                self.model, {**self.config.describe(), 'calibration_rule': CALIBRATION_RULE}, None
            )
        return {**self._float, 'calibration': calibration}

    def wrap(self) -> QuantReport:
        """Swap every site for its fake-quant module (FLOAT state: outputs unchanged)."""
        self._float_identity(None)  # raises if the model is already quantized
        sites = self.sites()
        bits = self.resolve_bits(sites)
        per_channel = {p.layer for p in self.pairs}
        self_converted = {s.name for a in self._active() for s in a.sites()} - {
            n for a in self._active() for n in a.wrapped_layers()
        }
        layer_names = {s.name for s in sites if s.kind != 'matmul' and s.name not in self_converted}
        wrap_modules(
            self.model,
            lambda name, m: LayerQuantConfig(*bits[name], per_channel_input=name in per_channel)
            if name in layer_names
            else None,
        )
        for a in self._active():
            a.convert_(bits)
        granularity = {s.name: site_granularity(s, per_channel) for s in sites}
        if self.config.gelu_scales is not None:
            modules = dict(self.model.named_modules())
            for name in self._post_gelu_layers(sites):
                modules[name].input_quantizer = RegionUniformQuantizer(bits[name][1])
                granularity[name] = f'w:channel a:regions ({self.config.gelu_scales})'
        floats = [
            {'name': u.name, 'family': u.family, 'reason': u.reason, 'params': u.params} for u in self.unsupported
        ]
        self.report = QuantReport(
            self.config.describe(), sites, bits, granularity, float_modules=floats, warnings=self._plan_warnings()
        )
        return self.report

    def _post_gelu_layers(self, sites: list[Site]) -> list[str]:
        """The adapters' ``fc2`` sites: the second Linear of a Swin MLP, whose input is a GELU's output."""
        covered = {s.name for a in self._active() for s in a.sites()}
        return [s.name for s in sites if s.layer_type == 'fc2' and s.name in covered]

    def _plan_warnings(self) -> list[str]:
        """A plan made from random weights runs, but loudly: logged now, and kept in the report."""
        reason = self.config.load_plan().placeholder_reason()
        if reason is None:
            return []
        name = self.config.plan if isinstance(self.config.plan, str) else 'the bit plan'
        message = (
            f'PLACEHOLDER BIT PLAN: {name}: {reason}. Its budget holds, but which layers get more or fewer '
            f'bits is not meaningful: results with it are NOT LRP-QViT mixed-precision results and must not '
            f"be reported as such. Make a real plan from the classifier's trained weights: "
            f'{plan_command(name)}'
        )
        self.logger.warning(message)
        return [message]

    def _thin_range_warnings(self, n_images: float) -> list[str]:
        """Per-channel ranges from a handful of values per channel: logged and kept in the report.

        RepQ's per-channel ranges of the post-LayerNorm inputs are that data's extremes; where they rest
        on few values (one 224-px image holds 49 tokens in the last Swin stage) they describe that
        image, not the images to come, and every other image is clipped (docs/method.md, calibration
        protocol). The parameters stay exactly RepQ-ViT's; the user is told and told the fix."""
        thin = thin_channel_ranges(self.model, MIN_VALUES_PER_CHANNEL)
        if not thin:
            return []
        thin.sort(key=lambda item: item[1])
        fewest = thin[0][1]
        names = ', '.join(name for name, _ in thin[:3]) + (', ...' if len(thin) > 3 else '')
        n = int(n_images) if float(n_images).is_integer() else n_images
        message = (
            f'THIN CALIBRATION: the per-channel ranges of {len(thin)} quantized layer input(s) ({names}) rest '
            f'on as few as {fewest} values per channel (from {n} calibration image(s)); with fewer than '
            f'{MIN_VALUES_PER_CHANNEL} they fit these images and clip others. On the miniature world this '
            f'costs the classifier 24 top-1 points at W8A8 with one image (none with four) and lets the '
            f"choice of the one image move a detector's W4A4 box AP over 4 points (0.9 with four). "
            f'Calibrate on more images (calib num_images, --num-calib).'
        )
        self.logger.warning(message)
        return [message]

    # ------------------------------------------------------------------ calibrate + reparam
    def calibrate(
        self,
        batches: Iterable,
        run: Callable[[nn.Module, Any], Any],
        *,
        images_in: Callable[[Any], float] = lambda batch: 1,
        image_ids: list | None = None,
        input_shape: tuple[int, int] | None = None,
        calibration: dict | None = None,
        batch_size: int = 1,
        progress: Callable[[float], None] | None = None,
        reconstruct_batches: Callable[[], Iterable] | None = None,
        reconstruct_progress: bool = False,
    ) -> QuantReport:
        """Stream the calibration batches, reparameterize (RepQ/CRL), reconstruct if configured, and
        re-quantize the weights; with SQ-b, smooth first (a float pass over the calibration images).

        ``calibration``: the settings that chose the images (recorded in the state's identity).
        ``reconstruct_batches()``: the calibration batches again, freshly, on every call (needed when
        the config asks for reconstruction or SQ-b; ``batches`` is a one-shot stream).
        """
        for option in ('reconstruct', 'smooth'):
            if getattr(self.config, option) is not None and reconstruct_batches is None:
                raise ValueError(
                    f'{option} reads the calibration images again: pass reconstruct_batches '
                    '(a callable returning a fresh iterable of the calibration batches)'
                )
        self.identity = self._float_identity(calibration)
        if self.report is None:
            self.wrap()
        device = model_device(self.model)
        _peak_memory_reset(device)
        smoothing = self.smooth(reconstruct_batches(), run) if self.config.smooth is not None else None
        start = time.perf_counter()
        with count_macs(self.model) as macs:
            n_images = calibrate_stream(self.model, batches, run, images_in=images_in, progress=progress)
        seconds = time.perf_counter() - start
        r = self.report
        r.warnings.extend(self._thin_range_warnings(n_images))
        r.sites = sites_with_macs(r.sites, macs, n_images)
        r.input_shape = input_shape
        r.calibration = {
            'num_images': int(n_images) if float(n_images).is_integer() else n_images,
            'image_ids': list(image_ids or []),
            'batch_size': batch_size,
            'rule': CALIBRATION_RULE,
            'seconds': round(seconds, 2),
            **_peak_memory(device),
            'settings': calibration,
        }
        if smoothing is not None:
            r.calibration['smoothing'] = smoothing
        self.reparameterize()
        if self.config.reconstruct is not None:
            start = time.perf_counter()
            done = self.reconstruct(reconstruct_batches, run, images_in=images_in, progress=reconstruct_progress)
            r.calibration['reconstruction'] = {**done, 'seconds': round(time.perf_counter() - start, 2)}
        self.requantize_weights()
        return r

    def reconstruct(
        self,
        batches: Callable[[], Iterable],
        run: Callable[[nn.Module, Any], Any],
        *,
        images_in: Callable[[Any], float] = lambda batch: 1,
        progress: bool = False,
    ) -> dict:
        """Learn rounding and step sizes (:mod:`mmdet_lrpq.quant.reconstruct`): the adapters' block
        chains whole, then the detector's heads, then every other quantized layer in scope alone."""
        chains = [units for a in self._active() if (units := a.units())]
        inside = {id(m) for chain in chains for u in chain for m in u.module.modules()}
        layers = {
            name: m
            for name, m in quant_modules(self.model).items()
            if isinstance(m, (QuantConv2d, QuantLinear)) and id(m) not in inside
        }
        return reconstruct_(
            self.model,
            chains,
            head_units(self.model) if self.config.scope == 'detector' else [],
            layers,
            batches,
            run,
            self.config.reconstruct,
            images_in=images_in,
            progress=progress,
        )

    def requantize_weights(self) -> None:
        """Re-calibrate and cache every weight quantizer now (reparameterization changed weights)."""
        for m in quant_modules(self.model).values():
            if isinstance(m, (QuantConv2d, QuantLinear)):
                m.quantized_weight()

    def smooth(self, batches: Iterable, run: Callable[[nn.Module, Any], Any]) -> dict:
        """SQ-b (:mod:`mmdet_lrpq.quant.smooth`): record the paired layers' input ranges in float over
        ``batches``, then fold a shift and a scale into every LayerNorm pair."""
        modules = dict(self.model.named_modules())
        start = time.perf_counter()
        n_batches = 0
        set_quant_state(self.model, QuantState.FLOAT)
        with recording_ranges({p.layer: modules[p.layer] for p in self.smooth_pairs}) as ranges, torch.no_grad():
            for batch in batches:
                run(self.model, batch)
                n_batches += 1
        tag = f'{self.config.smooth}(alpha={self.config.smooth_alpha:g})'
        for pair in self.smooth_pairs:
            ranges[pair.layer].check(pair.layer)
            norm = modules[pair.norm]
            res = smooth_(norm, modules[pair.layer], ranges[pair.layer], self.config.smooth_alpha)
            if pair.shift_owner is not None:
                apply_reparam_shift(modules[pair.shift_owner], norm, res)
            self.report.reparameterized[pair.layer] = tag
        return {
            'method': tag,
            'pairs': len(self.smooth_pairs),
            'batches': n_batches,
            'seconds': round(time.perf_counter() - start, 2),
        }

    def reparameterize(self) -> None:
        modules = dict(self.model.named_modules())
        tag = f'crl(k={self.config.crl_k:g})' if self.config.method == 'crl' else 'repq'
        for pair in self.pairs:
            norm, layer = modules[pair.norm], modules[pair.layer]
            res = reparameterize_(norm, layer, k=self.config.clip_k, round_zero_point=self.config.round_zero_point)
            if pair.shift_owner is not None:
                apply_reparam_shift(modules[pair.shift_owner], norm, res)
            smoothed = self.report.reparameterized.get(pair.layer)
            self.report.reparameterized[pair.layer] = f'{smoothed}+{tag}' if smoothed else tag
            self.report.granularity[pair.layer] = 'w:channel a:channel→tensor'

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        """Everything needed to restore the calibrated model without recalibrating, and its identity."""
        return make_state(self.identity, self.report, self.model)

    def check_state(
        self, state: dict, calibration: dict | None, where: str = 'the calibrated state', path: str | None = None
    ) -> None:
        """Raise :class:`.state.StateMismatchError` unless ``state`` was made from this model and these inputs
        (:func:`.state.check_identity`; ``path``: the state's file, named in the fix)."""
        check_identity(state.get('identity', {}), self._float_identity(calibration), where, path, self.logger)

    def load_state(
        self, state: dict, calibration: dict | None = None, where: str = 'the calibrated state', path: str | None = None
    ) -> QuantReport:
        """Check ``state`` (see :meth:`check_state`), then restore it without recalibrating."""
        self.check_state(state, calibration, where, path)
        self.wrap()
        self.identity = state['identity']
        load_tensors(self.model, state['state_dict'], model_device(self.model), where)
        set_quant_state(self.model, QuantState.QUANTIZED)
        saved = QuantReport.from_dict(state['report'])
        self.report.sites, self.report.calibration = saved.sites, saved.calibration
        self.report.input_shape, self.report.reparameterized = saved.input_shape, saved.reparameterized
        for name in {p.layer for p in self.pairs} & set(saved.reparameterized):
            self.report.granularity[name] = 'w:channel a:channel→tensor'
        return self.report


__all__ = ['ModelQuantizer', 'model_device', 'images_in']
