"""``QuantConfig``: every quantization option, as one frozen object (torchao style).

The same fields are the keyword arguments of ``QuantizationHook`` (config files), of the
``QuantSwinTransformer`` backbone type (its ``quant=dict(...)``) and of
:func:`mmdet_lrpq.quantize_` (Python), so ``help(QuantConfig)`` documents all three.
Pure: no torch model code, no mmdet.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

from .bits import check_bits
from .plan import BitPlan, Site
from .quant.options import from_options
from .quant.reconstruct_config import ReconstructConfig
from .quant.smooth import DEFAULT_ALPHA

METHODS = ('repq', 'crl', 'none')
SCOPES = ('detector', 'backbone')
DEFAULT_CRL_K = 3.0
SMOOTHINGS = ('sq-b',)
GELU_SCALES = ('opt-m',)
# Options added after states and result files were first written: :meth:`QuantConfig.describe` names
# them only when set, so the identity of a state made without them is unchanged.
_NAMED_WHEN_SET = {'smooth': ('smooth', 'smooth_alpha'), 'gelu_scales': ('gelu_scales',)}


def plan_command(path: str) -> str:
    """The tools/lrp_plan.py command that makes the plan ``path`` (from its name, when standard)."""
    m = re.search(r'swin_([ts])_mp(\d)', os.path.basename(path))
    model = {'t': 'swin_tiny_patch4_window7_224', 's': 'swin_small_patch4_window7_224'}[m.group(1)] if m else 'MODEL'
    target = f'mp{m.group(2)}' if m else 'mpK'
    return (
        f'python tools/lrp_plan.py --model {model} --checkpoint CLASSIFIER.pth --images IMAGENET_DIR '
        f'--target {target} --out {path}   (see configs/plans/README.md)'
    )


@dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized.

    w_bits, a_bits:       uniform bits (2..8) of weights and input activations, when no ``plan`` is given.
    plan:                 a bit plan (``BitPlan`` or the path of its JSON file): site name or ``re:``
                          pattern -> (w_bits, a_bits); takes precedence over ``w_bits``/``a_bits``.
    method:               ``'repq'`` (RepQ-ViT's scale reparameterization of post-LayerNorm inputs),
                          ``'crl'`` (clipped channel-wise + reparameterization, LRP-QViT) or ``'none'``.
    crl_k:                CRL's clipping in standard deviations (``inf`` = RepQ).
    scope:                ``'detector'``: every Conv2d/Linear of the model plus the attention matmuls
                          (RepQ-ViT's protocol); ``'backbone'``: only what an architecture adapter covers
                          (the Swin backbone).
    round_zero_point:     round RepQ's layer-wise zero point (makes reparameterization exact).
    patch_embed_a_bits:   bits of the patch-embedding input (RepQ-ViT keeps the image at 8); ``None``:
                          what the plan says.
    reparam_output_norms: also reparameterize the backbone's output norms into the FPN's 1x1 laterals
                          (default: for ``'crl'``).
    reconstruct:          ``None`` (default, the papers' protocol): stop after calibration; a
                          ``ReconstructConfig`` or its options as a dict: then learn the weights'
                          rounding and the activation step sizes block by block on the calibration
                          images (see :mod:`mmdet_lrpq.quant.reconstruct`).
    smooth:               ``None`` (default) or ``'sq-b'``: MPTQ-ViT's SmoothQuant with a bias term. Before
                          calibration, one float pass over the calibration images records every
                          post-LayerNorm layer input's channel ranges; a per-channel shift (into the
                          LayerNorm bias) and scale (into the layer's weights) are folded in, exactly
                          in float (see :mod:`mmdet_lrpq.quant.smooth`). Same LayerNorm pairs as the
                          reparameterization: with ``method='crl'`` CRL then acts on the smoothed inputs;
                          with RepQ (``'repq'``, or ``'crl'`` with ``crl_k=inf``) it is refused, since RepQ
                          re-derives every channel's scale and shift from calibration and cancels SQ-b's.
                          The calibration images must be re-iterable (a list, not a one-shot stream).
    smooth_alpha:         SQ-b's migration strength α in [0, 1] (SmoothQuant's ``s = a^α / w^(1-α)``).
    gelu_scales:          ``None`` (default: post-GELU inputs on the uniform quantizer) or ``'opt-m'``:
                          MPTQ-ViT's OPT-m, region-wise scales for the MLP's ``fc2`` input (negative and
                          non-negative regions, steps in a searched power-of-two ratio ``2^m``; see
                          :class:`mmdet_lrpq.quant.RegionUniformQuantizer`). Works with every ``method``;
                          not with ``reconstruct`` (which learns uniform step sizes) nor ONNX export.
    """

    w_bits: int = 4
    a_bits: int = 4
    plan: None | str | os.PathLike | BitPlan = None
    method: str = 'crl'
    crl_k: float = DEFAULT_CRL_K
    scope: str = 'detector'
    round_zero_point: bool = False
    patch_embed_a_bits: int | None = 8
    reparam_output_norms: bool | None = None
    reconstruct: None | dict | ReconstructConfig = None
    smooth: str | None = None
    smooth_alpha: float = DEFAULT_ALPHA
    gelu_scales: str | None = None
    _plan_cache: BitPlan | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f'method must be one of {METHODS}, got {self.method!r}')
        if self.scope not in SCOPES:
            raise ValueError(f'scope must be one of {SCOPES}, got {self.scope!r}')
        if self.smooth not in (None, *SMOOTHINGS):
            raise ValueError(f'smooth must be None or one of {SMOOTHINGS}, got {self.smooth!r}')
        if self.gelu_scales not in (None, *GELU_SCALES):
            raise ValueError(f'gelu_scales must be None or one of {GELU_SCALES}, got {self.gelu_scales!r}')
        for name in ('w_bits', 'a_bits'):
            try:
                check_bits(getattr(self, name))
            except ValueError as err:
                raise ValueError(f'{name}: {err}') from None
        if self.patch_embed_a_bits is not None:
            try:
                check_bits(self.patch_embed_a_bits)
            except ValueError as err:
                raise ValueError(f'patch_embed_a_bits: {err}') from None
        try:
            k = float(self.crl_k)
        except (TypeError, ValueError):
            raise ValueError(f'crl_k must be a number of standard deviations (or inf), got {self.crl_k!r}') from None
        if not k > 0:
            raise ValueError(f'crl_k must be > 0 standard deviations (inf for RepQ), got {self.crl_k}')
        object.__setattr__(self, 'crl_k', k)
        if self.reparam_output_norms is None:
            object.__setattr__(self, 'reparam_output_norms', self.method == 'crl')
        if isinstance(self.reconstruct, dict):
            object.__setattr__(self, 'reconstruct', ReconstructConfig.from_options(self.reconstruct))
        elif self.reconstruct is not None and not isinstance(self.reconstruct, ReconstructConfig):
            raise TypeError(
                f'reconstruct must be None, a ReconstructConfig or a dict of its options; got '
                f'{type(self.reconstruct).__name__}'
            )
        try:
            alpha = float(self.smooth_alpha)
        except (TypeError, ValueError):
            raise ValueError(f'smooth_alpha must be a number in [0, 1], got {self.smooth_alpha!r}') from None
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f'smooth_alpha must be in [0, 1], got {alpha}')
        object.__setattr__(self, 'smooth_alpha', alpha)
        if self.smooth is not None and self.method != 'none' and math.isinf(self.clip_k):
            what = "method='repq'" if self.method == 'repq' else "method='crl' with crl_k=inf (RepQ)"
            raise ValueError(
                f'smooth={self.smooth!r} cannot be combined with {what}: RepQ re-derives every '
                f"post-LayerNorm channel's scale and shift from its calibration, which cancels "
                f"SQ-b's on the same LayerNorm pairs. Use method='none' (SQ-b alone, MPTQ-ViT's "
                f"setting) or method='crl' with a finite crl_k, or drop smooth"
            )
        if self.gelu_scales is not None and self.reconstruct is not None:
            raise ValueError(
                f'gelu_scales={self.gelu_scales!r} cannot be combined with reconstruct: '
                f'reconstruction learns the step sizes of uniform quantizers, and the post-GELU '
                f'region-wise quantizer has a searched power-of-two ratio instead. Drop one of '
                f'gelu_scales and reconstruct'
            )
        if isinstance(self.plan, os.PathLike):
            object.__setattr__(self, 'plan', os.fspath(self.plan))
        if isinstance(self.plan, str):
            if not os.path.isfile(self.plan):
                raise FileNotFoundError(
                    f'bit plan not found: {self.plan}. It is not made silently uniform; '
                    f'make it with: {plan_command(self.plan)}'
                )
        elif self.plan is not None and not isinstance(self.plan, BitPlan):
            raise TypeError(
                f'plan must be a BitPlan, the path of a plan JSON file, or None; got {type(self.plan).__name__}'
            )

    @classmethod
    def from_options(cls, options: dict, where: str = 'quantization options') -> QuantConfig:
        """From keyword options (a config's dict), naming unknown ones instead of a bare TypeError."""
        return from_options(cls, options, where)

    @property
    def clip_k(self) -> float:
        """The clipping actually applied: CRL's k, or infinity (RepQ)."""
        return self.crl_k if self.method == 'crl' else math.inf

    def pinned_act_bits(self, sites: Iterable[Site]) -> dict[str, int]:
        """Site -> input bits this config fixes whatever the plan says (the patch embedding's image input)."""
        if self.patch_embed_a_bits is None:
            return {}
        return {s.name: self.patch_embed_a_bits for s in sites if s.layer_type == 'patch_embed'}

    def load_plan(self) -> BitPlan:
        """The plan in effect (uniform bits when none is given); a file is read once."""
        if self.plan is None:
            return BitPlan.uniform(self.w_bits, self.a_bits)
        if isinstance(self.plan, BitPlan):
            return self.plan
        if self._plan_cache is None:
            assert isinstance(self.plan, str)  # (__post_init__ turned a path-like into its str)
            object.__setattr__(self, '_plan_cache', BitPlan.load(self.plan))
        assert self._plan_cache is not None
        return self._plan_cache

    def describe(self) -> dict:
        """JSON-ready options; a plan is named by its path (or ``<BitPlan>``) and its content hash."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        out['crl_k'] = self.crl_k if math.isfinite(self.crl_k) else 'inf'
        plan = out.pop('plan')
        out['plan'] = None if plan is None else (plan if isinstance(plan, str) else '<BitPlan>')
        out['plan_sha256'] = self.load_plan().content_hash()
        assert not isinstance(self.reconstruct, dict)  # (__post_init__ made it a ReconstructConfig)
        out['reconstruct'] = None if self.reconstruct is None else self.reconstruct.describe()
        for option, names in _NAMED_WHEN_SET.items():
            if getattr(self, option) is None:
                for name in names:
                    del out[name]
        return out


__all__ = ['QuantConfig', 'METHODS', 'SCOPES', 'DEFAULT_CRL_K', 'SMOOTHINGS', 'GELU_SCALES', 'plan_command']
