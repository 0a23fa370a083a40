"""``export_onnx``: a quantized module's integer form as an ONNX QDQ graph.

How: every quantizer of the module is swapped, for the duration of the export only, for a marker
(an autograd function whose forward is the quantizer's own PyTorch computation and whose ONNX
symbolic is one ``lrpq::Marker`` node). PyTorch's TorchScript exporter (``dynamo=False``, chosen
deliberately: the traced graph keeps our markers as single nodes and needs no custom-op
registration) traces the module at opset ``min(opset, 20)``; :func:`~.lower.lower` then replaces
every marker by its integer form (:mod:`.forms`) and sets the opset (opsets 20 and 21 differ for
the ops emitted here only by 21's 4-bit and 16-bit integer types). The graph is checked by
``onnx.checker`` (with shape inference) before it is written.

Everything else is exported as the model runs it: LayerNorms with their reparameterized affine,
the reparameterization shift added after window padding, softmax, GELU, residual adds, biases and
relative position biases in float.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from ..quant.modules import (
    LogSqrt2Quantizer,
    QuantMatMul,
    QuantModule,
    QuantState,
    UniformQuantizer,
    _WeightedQuantModule,
    quant_modules,
)
from .forms import (
    FRACTIONAL_POLICIES,
    INT4_OPSET,
    ExportError,
    LogSqrt2Form,
    UniformActForm,
    WeightForm,
    _plural,
    log_sqrt2_form,
    uniform_act_form,
    weight_form,
)
from .lower import MARKER_DOMAIN, MARKER_OP, Form, Lowered, lower, strip_prefix

MIN_OPSET, MAX_OPSET = 17, 21  # LayerNormalization is an op from 17; 4-bit types from 21
TORCHSCRIPT_MAX_OPSET = 20
_ACTIVE: dict[int, Any] = {}  # marker id -> the PyTorch computation it stands for (during export)


class _Marker(torch.autograd.Function):
    """Identity to the tracer's eye: computes what the quantizer computes, exports as one marker node."""

    @staticmethod
    def forward(ctx, x: Tensor, idx: int) -> Tensor:
        state = torch._C._get_tracing_state()  # the quantizer's own ops (fused kernels) are not traced:
        torch._C._set_tracing_state(None)  # the marker node stands for them
        try:
            return _ACTIVE[idx](x).clone()
        finally:
            torch._C._set_tracing_state(state)

    @staticmethod
    def symbolic(g, x, idx: int):
        out = g.op(f'{MARKER_DOMAIN}::{MARKER_OP}', x, id_i=idx)
        out.setType(x.type())
        return out


@dataclass
class Site:
    """One quantizer of the exported module: its form and the module that runs it in PyTorch."""

    name: str
    form: Form
    quantizer: nn.Module


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote, how each quantizer is represented, and PyTorch's outputs."""

    path: str
    opset: int
    sites: dict[int, Site]
    lowered: Lowered
    input_name: str
    output_names: list[str]
    example_input: np.ndarray
    torch_outputs: list[np.ndarray]
    options: dict = field(default_factory=dict)

    @property
    def file_bytes(self) -> int:
        return os.path.getsize(self.path)

    def summary(self) -> dict:
        """Counts by kind and carrier, what stays float and why (the tool prints and saves this)."""
        forms = [s.form for s in self.sites.values()]
        weights = [f for f in forms if isinstance(f, WeightForm)]
        acts = [f for f in forms if isinstance(f, UniformActForm)]
        logs = [f for f in forms if isinstance(f, LogSqrt2Form)]
        by_carrier: dict[str, int] = {}
        for f in weights:
            by_carrier[f.carrier.name] = by_carrier.get(f.carrier.name, 0) + 1
        act_carriers: dict[str, int] = {}
        for f in acts:
            key = f.carrier.name + ('+Clip' if f.clip is not None else '') if f.integer else 'float (fractional zp)'
            act_carriers[key] = act_carriers.get(key, 0) + 1
        return {
            'file': self.path,
            'file_mb': round(self.file_bytes / 2**20, 3),
            'opset': self.opset,
            'options': self.options,
            'weights': {
                'count': len(weights),
                'carriers': by_carrier,
                'params': int(sum(f.stored.size for f in weights)),
                'bits': {str(b): sum(f.bits == b for f in weights) for b in sorted({f.bits for f in weights})},
            },
            'activations': {
                'count': len(acts),
                'qdq': sum(f.integer for f in acts),
                'carriers': act_carriers,
                'float_sites': [f.site for f in acts if not f.integer],
                'rounded_zero_point_sites': [f.site for f in acts if 'rounded' in f.note],
            },
            'log_sqrt2': {'count': len(logs), 'exact': True},
            'nodes_added': self.lowered.nodes,
            'float_ops': 'LayerNorm, softmax, GELU, residual adds, biases, relative position bias; attn@v (its '
            'log-sqrt2 operand is not uniform); fractional-zero-point sites',
        }


def check_quantized(module: nn.Module, what: str = 'the model') -> dict[str, QuantModule]:
    """Every quantized module of ``module``, or an error saying why it cannot be exported."""
    mods = quant_modules(module)
    if not mods:
        raise ExportError(
            f'{what} was never quantized (it has no quantized layers): quantize it first with '
            f'mmdet_lrpq.quantize_(model, config, calib=...) or init_quantized_detector(config, '
            f'checkpoint), or pass the calibrated state (tools/export_onnx.py --state STATE)'
        )
    not_ready = [n for n, m in mods.items() if m.state is not QuantState.QUANTIZED or not m.calibrated]
    if not_ready:
        raise ExportError(
            f'{len(not_ready)} quantized layer(s) are not calibrated/in the QUANTIZED state: '
            f'{_plural(not_ready)}; finish calibration (quantize_ does it) before exporting'
        )
    return mods


def _forms(mods: dict[str, QuantModule], opset: int, fractional: str, int4_activations: bool) -> dict[str, tuple]:
    """(form, quantizer, kind) by site name; refuses 4-bit sites below opset 21 all at once."""
    out: dict[str, tuple] = {}
    unsupported = []
    for name, m in mods.items():
        if isinstance(m, _WeightedQuantModule):
            out[f'{name}.weight'] = ('weight', m, None)
        elif not isinstance(m, QuantMatMul):
            unsupported.append(f'{name} ({type(m).__name__})')
            continue
        other = [
            type(q).__name__ for q in m.input_quantizers() if not isinstance(q, (UniformQuantizer, LogSqrt2Quantizer))
        ]
        if other:  # (e.g. OPT-m's region-wise post-GELU quantizer) never exported as if it were absent
            unsupported.append(f'{name} ({", ".join(other)})')
            continue
        for qname, q in m.named_children():
            if isinstance(q, (UniformQuantizer, LogSqrt2Quantizer)) and q in m.input_quantizers():
                out[f'{name}.{qname}'] = ('act', m, q)
    if unsupported:
        raise ExportError(
            f'no ONNX form for these quantized modules yet: {_plural(unsupported)}; export a part of the '
            f'model without them (e.g. the backbone and neck)'
        )
    low = [
        f'{s} ({m.weight_quantizer.bits}-bit)'
        for s, (kind, m, _) in out.items()
        if kind == 'weight' and m.weight_quantizer.bits <= 4
    ]
    if low and opset < INT4_OPSET:
        raise ExportError(
            f'opset {opset} has no 4-bit integer type, but {len(low)} weight site(s) have <= 4 bits: '
            f'{_plural(low)}; export with opset={INT4_OPSET} (int4 weights), or quantize those sites '
            f'with more bits'
        )
    forms = {}
    for site, (kind, m, q) in out.items():
        if kind == 'weight':
            forms[site] = (weight_form(site, m.weight_quantizer, m.quantized_weight(), opset), m)
        elif isinstance(q, LogSqrt2Quantizer):
            forms[site] = (log_sqrt2_form(site, q), q)
        else:
            forms[site] = (uniform_act_form(site, q, opset, fractional, int4_activations), q)
    return forms


@contextlib.contextmanager
def _markers(forms: dict[str, tuple]) -> Iterator[dict[int, Site]]:
    """Swap quantizers and weight accessors for markers (instance attributes, removed afterwards)."""
    sites: dict[int, Site] = {}
    patched: list[tuple[nn.Module, str]] = []
    hooks = []
    try:
        for idx, (site, (form, owner)) in enumerate(forms.items()):
            sites[idx] = Site(site, form, owner)
            if isinstance(form, WeightForm):
                fq = owner.quantized_weight().detach()
                _ACTIVE[idx] = lambda w, fq=fq: fq
                owner.quantized_weight = lambda idx=idx, m=owner: _Marker.apply(m.weight, idx)
                patched.append((owner, 'quantized_weight'))
            else:
                q = owner
                _ACTIVE[idx] = lambda x, q=q: type(q).forward(q, x)
                q.forward = lambda x, scratch=None, idx=idx: _Marker.apply(x, idx)
                patched.append((q, 'forward'))
                # a quantizer with a hook is called without the reused scratch buffer (QuantModule), a
                # tensor the tracer would not know
                hooks.append(q.register_forward_hook(lambda *args: None))
        yield sites
    finally:
        for module, attr in patched:
            module.__dict__.pop(attr, None)
        for h in hooks:
            h.remove()
        _ACTIVE.clear()


class _Traced(nn.Module):
    """The exported module, with a state dict of tensors only: the tracer detaches every state-dict
    value, and quantizers keep their bit-width as (non-tensor) extra state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Any:
        return self.model(x)

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)  # (the destination a parent module passed in)
        for key in [k for k, v in state.items() if not isinstance(v, Tensor)]:
            del state[key]
        return state


def _flatten(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    raise ExportError(f'cannot export an output of type {type(out).__name__} (tensors, tuples, lists, dicts only)')


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Tensor,
    *,
    opset: int = INT4_OPSET,
    fractional_zero_point: str = 'exact',
    int4_activations: bool = False,
    output_names: Sequence[str] | None = None,
) -> ExportResult:
    """Export quantized ``model`` (called as ``model(example_input)``) to ``path`` as an ONNX QDQ graph.

    ``opset``: 17..21; 4-bit weights need 21 (int4/uint4). ``fractional_zero_point``: ``'exact'``
    (float ops at those sites, the default), ``'round'`` (QDQ with the rounded zero point) or
    ``'error'`` (see :mod:`.forms`). ``int4_activations``: carry ≤ 4-bit activations in ``uint4``
    instead of ``uint8`` + ``Clip`` (same values; ONNX Runtime has no 4-bit integer kernels and
    then dequantizes). The input shape is fixed to ``example_input``'s (Swin's window padding and
    shift masks depend on it). Returns the :class:`ExportResult`; raises :class:`ExportError`.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f'opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET} ({INT4_OPSET} for 4-bit weights)'
        )
    if fractional_zero_point not in FRACTIONAL_POLICIES:
        raise ExportError(f'fractional_zero_point must be one of {FRACTIONAL_POLICIES}')
    if int4_activations and opset < INT4_OPSET:
        raise ExportError(f'int4_activations needs opset {INT4_OPSET}')
    mods = check_quantized(model)
    if (
        not isinstance(example_input, Tensor)
        or example_input.dtype != torch.float32
        or example_input.device.type != 'cpu'
    ):
        raise ExportError('example_input must be a float32 CPU tensor (move the model and input to the CPU to export)')
    if any(p.device.type != 'cpu' for p in model.parameters()):
        raise ExportError('the model has parameters off the CPU: call model.cpu() before exporting')
    modes = {m: m.training for m in model.modules()}  # restored module by module (train() would recurse)
    model.eval()
    forms = _forms(mods, opset, fractional_zero_point, int4_activations)
    with torch.no_grad():
        reference = [t.detach().float().numpy().copy() for t in _flatten(model(example_input))]
    names = list(output_names) if output_names else [f'output_{i}' for i in range(len(reference))]
    if len(names) != len(reference):
        raise ExportError(f'{len(names)} output names for {len(reference)} outputs')
    buf = io.BytesIO()
    try:
        with _markers(forms) as sites, torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='.*legacy TorchScript-based ONNX export.*')
            warnings.filterwarnings('ignore', message='.*The feature will be removed.*')
            warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
            torch.onnx.export(
                _Traced(model),
                (example_input,),
                buf,
                dynamo=False,
                opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
                input_names=['input'],
                output_names=names,
                custom_opsets={MARKER_DOMAIN: 1},
            )
    except ExportError:
        raise
    except Exception as err:  # the exporter names the op it could not express
        raise ExportError(
            f'the ONNX exporter could not express an op of {type(model).__name__}: {err}\n'
            f'fix: export only the part of the model whose ops ONNX has (the backbone and neck of a '
            f'detector), or replace that op'
        ) from err
    finally:
        for m, training in modes.items():
            m.training = training
    proto = onnx.load_from_string(buf.getvalue())
    strip_prefix(proto, 'model')
    lowered = lower(proto, {i: s.form for i, s in sites.items()}, opset)
    missing = [s.name for i, s in sites.items() if i not in lowered.code_tensors and not isinstance(s.form, WeightForm)]
    if missing:
        raise ExportError(
            f'these quantizers did not run in the traced forward: {_plural(missing)} (is example_input reaching them?)'
        )
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as err:
        raise ExportError(f'the exported graph failed the ONNX checker: {err}') from err
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx.save(proto, path)
    return ExportResult(
        path,
        opset,
        sites,
        lowered,
        'input',
        names,
        example_input.numpy().copy(),
        reference,
        {'fractional_zero_point': fractional_zero_point, 'int4_activations': int4_activations},
    )


__all__ = ['export_onnx', 'ExportResult', 'ExportError', 'check_quantized', 'MIN_OPSET', 'MAX_OPSET']
