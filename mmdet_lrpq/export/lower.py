"""Lower the traced graph's quantizer markers to standard ONNX: QDQ pairs, integer weights, log-√2 ops.

The TorchScript exporter traces the model with every quantizer replaced by one ``lrpq::Marker`` node
(attribute ``id``); :func:`lower` replaces each marker by the ops of its form (:mod:`.forms`):

* weight: ``DequantizeLinear(codes, scale, zp, axis)`` on an integer initializer (a ``Transpose``
  that only feeds it is folded into the stored codes, so ``DequantizeLinear`` feeds the ``MatMul``
  directly, the pattern runtimes fuse into integer kernels);
* uniform activation: ``QuantizeLinear → [Clip] → DequantizeLinear`` (``Clip`` in the carrier type,
  present when the carrier has more levels than the quantizer's ``2^b``); with a fractional zero point
  and ``policy='exact'``: ``Div → Round → Clip → Mul`` in float (ONNX ``Round`` is half to even, as
  ``torch.round``);
* log-√2: a code estimate from ``Log`` that is the code or one above it, corrected by one comparison
  with the exact threshold, then ``Gather`` from the per-code table (nodes named ``lrpq_log_sqrt2/...``
  so a profile can sum their cost).

Each lowered quantizer records the tensor that holds its codes (``code_tensors``) and the float tensor
it reads (``input_tensors``): the parity check compares the codes with PyTorch's, and also feeds each
quantizer's graph input to the PyTorch quantizer, which isolates the quantizer's own form from
differences its input inherited from earlier ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .forms import Carrier, ExportError, LogSqrt2Form, UniformActForm, WeightForm

MARKER_DOMAIN = 'lrpq'
MARKER_OP = 'Marker'
# δ of the log-sqrt2 code estimate: float32 log2 errors are ~1e-5 codes at most, far below it
_LOG_MARGIN = 0.01
_NP = {
    'uint8': np.uint8,
    'int8': np.int8,
    'uint16': np.uint16,
    'int16': np.int16,
    'uint4': ml_dtypes.uint4,
    'int4': ml_dtypes.int4,
}
Form = WeightForm | UniformActForm | LogSqrt2Form


@dataclass
class Lowered:
    """Where each quantizer ended up in the graph (by marker id)."""

    code_tensors: dict[int, list[str]] = field(default_factory=dict)  # marker id -> code tensor per call
    input_tensors: dict[int, list[str]] = field(
        default_factory=dict
    )  # marker id -> the float tensor it reads, per call
    order: list[tuple[int, int]] = field(default_factory=list)  # (marker id, call) in graph order
    nodes: dict[str, int] = field(default_factory=dict)  # op type -> count added


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.names: set[str] = (
            {i.name for i in self.graph.initializer}
            | {o for n in self.graph.node for o in n.output}
            | {i.name for i in self.graph.input}
        )
        self.added: dict[str, int] = {}

    def unique(self, base: str) -> str:
        base = base.replace('/', '.').strip('.') or 'lrpq'
        name, i = base, 1
        while name in self.names:
            name, i = f'{base}_{i}', i + 1
        self.names.add(name)
        return name

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.unique(base)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> onnx.NodeProto:
        self.added[op] = self.added.get(op, 0) + 1
        return helper.make_node(op, inputs, outputs, name=self.unique(name), **attrs)


def _carrier_array(values: np.ndarray, carrier: Carrier) -> np.ndarray:
    v = np.asarray(values)
    if v.size and (v.min() < carrier.lo or v.max() > carrier.hi):
        raise ExportError(f'values {v.min()}..{v.max()} outside the {carrier.name} range')
    return v.astype(_NP[carrier.name])


def _lower_weight(
    g: _Graph, marker: onnx.NodeProto, form: WeightForm, consumers: dict[str, list[onnx.NodeProto]], removed: set[int]
) -> tuple[list[onnx.NodeProto], str]:
    out = marker.output[0]
    stored, axis = form.stored, 0
    users = consumers.get(out, [])
    target = out
    if (
        len(users) == 1
        and users[0].op_type == 'Transpose'
        and stored.ndim == 2
        and [a.ints for a in users[0].attribute if a.name == 'perm'] in ([[1, 0]], [])
    ):
        stored, axis = stored.T, 1  # fold W^T into the stored codes: DQ feeds MatMul
        removed.add(id(users[0]))
        target = users[0].output[0]
    base = form.site  # '<layer>.weight'
    codes = g.const(f'{base}_quantized', _carrier_array(np.ascontiguousarray(stored), form.carrier))
    scale = g.const(f'{base}_scale', form.scale.astype(np.float32))
    zp = g.const(f'{base}_zero_point', _carrier_array(form.stored_zp, form.carrier))
    dq = g.node('DequantizeLinear', [codes, scale, zp], [target], f'{form.site}/DequantizeLinear', axis=axis)
    return [dq], target


def _bound(g: _Graph, base: str, value: np.ndarray, carrier: Carrier, axis: int | None, rank: int | None) -> str:
    v = _carrier_array(value, carrier)
    if v.ndim and axis is not None:
        if rank is None:
            raise ExportError(f'{base}: per-channel activation bounds need the input rank')
        shape = [1] * rank
        shape[axis % rank] = -1
        v = v.reshape(shape)
    return g.const(base, v)


def _lower_uniform(g: _Graph, marker: onnx.NodeProto, form: UniformActForm, rank: int | None) -> tuple[list, str]:
    x, out = marker.input[0], marker.output[0]
    site = form.site
    if not form.integer:  # fractional zero point, exact in float
        scale = g.const(f'{site}.scale', form.scale.astype(np.float32))
        lo = g.const(f'{site}.clip_min', (-form.zero_point).astype(np.float32))
        hi = g.const(f'{site}.clip_max', (np.float32(form.levels) - form.zero_point).astype(np.float32))
        t, r, c = (g.unique(f'{site}.{s}') for s in ('div', 'round', 'clip'))
        if form.axis is not None:
            raise ExportError(f'{site}: per-channel input quantizer with a fractional zero point cannot be exported')
        nodes = [
            g.node('Div', [x, scale], [t], f'{site}/fq/Div'),
            g.node('Round', [t], [r], f'{site}/fq/Round'),
            g.node('Clip', [r, lo, hi], [c], f'{site}/fq/Clip'),
            g.node('Mul', [c, scale], [out], f'{site}/fq/Mul'),
        ]
        return nodes, c
    c = form.carrier
    per_axis = form.axis is not None
    attrs = {'axis': form.axis} if per_axis else {}
    scale = g.const(f'{site}.scale', form.scale.astype(np.float32))
    zp = g.const(f'{site}.zero_point', _carrier_array(form.carrier_zp, c))
    q = g.unique(f'{site}.quantized')
    nodes = [g.node('QuantizeLinear', [x, scale, zp], [q], f'{site}/QuantizeLinear', **attrs)]
    code = q
    if form.clip is not None:
        lo_v, hi_v = form.clip
        clipped = g.unique(f'{site}.clipped')
        if not per_axis:
            lo = g.const(f'{site}.clip_min', _carrier_array(lo_v, c))
            hi = g.const(f'{site}.clip_max', _carrier_array(hi_v, c))
            nodes.append(g.node('Clip', [q, lo, hi], [clipped], f'{site}/Clip'))
        else:
            lo = _bound(g, f'{site}.clip_min', lo_v, c, form.axis, rank)
            hi = _bound(g, f'{site}.clip_max', hi_v, c, form.axis, rank)
            mid = g.unique(f'{site}.clip_low')
            nodes += [
                g.node('Max', [q, lo], [mid], f'{site}/ClipMin'),
                g.node('Min', [mid, hi], [clipped], f'{site}/ClipMax'),
            ]
        code = clipped
    nodes.append(g.node('DequantizeLinear', [code, scale, zp], [out], f'{site}/DequantizeLinear', **attrs))
    return nodes, code


def _lower_log_sqrt2(g: _Graph, marker: onnx.NodeProto, form: LogSqrt2Form) -> tuple[list, str]:
    """``c = clip(floor(-2·log2(x/Δ) + 0.5 + δ), 0, 2^b)`` is the code or one above it (log2 here and in
    PyTorch agree to far better than δ); one comparison with the exact threshold ``X_{c-1}`` takes it back
    down where needed. ``-2·log2(x/Δ) = k·ln x + 2·log2 Δ``, so no division."""
    x, out = marker.input[0], marker.output[0]
    site, levels = form.site, 1 << form.bits
    p = f'lrpq_log_sqrt2/{site}'
    k = g.const(f'{site}.minus2_over_ln2', np.float32(-2.0 / math.log(2.0)))
    offset = g.const(f'{site}.offset', np.float32(2.0 * math.log2(form.delta) + 0.5 + _LOG_MARGIN))
    zero = g.const(f'{site}.code_min', np.float32(0))
    top = g.const(f'{site}.code_max', np.float32(levels))
    down = g.const(
        f'{site}.thresholds', np.concatenate([[np.inf], form.thresholds]).astype(np.float32)
    )  # [c] = X_{c-1}
    table = g.const(f'{site}.table', form.table.astype(np.float32))
    t = [
        g.unique(f'{site}.{s}')
        for s in ('ln', 'scaled', 'shifted', 'floor', 'clipped', 'upper', 'bound', 'ge', 'step', 'code')
    ]
    nodes = [
        g.node('Log', [x], [t[0]], f'{p}/Log'),
        g.node('Mul', [t[0], k], [t[1]], f'{p}/Mul'),
        g.node('Add', [t[1], offset], [t[2]], f'{p}/Add'),
        g.node('Floor', [t[2]], [t[3]], f'{p}/Floor'),
        g.node('Clip', [t[3], zero, top], [t[4]], f'{p}/Clip'),
        g.node('Cast', [t[4]], [t[5]], f'{p}/Cast', to=TensorProto.INT32),
        g.node('Gather', [down, t[5]], [t[6]], f'{p}/GatherThreshold'),
        g.node('GreaterOrEqual', [x, t[6]], [t[7]], f'{p}/GreaterOrEqual'),
        g.node('Cast', [t[7]], [t[8]], f'{p}/CastStep', to=TensorProto.INT32),
        g.node('Sub', [t[5], t[8]], [t[9]], f'{p}/Sub'),
        g.node('Gather', [table, t[9]], [out], f'{p}/GatherValue'),
    ]
    return nodes, t[9]


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    infos = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    return {v.name: len(v.type.tensor_type.shape.dim) for v in infos if v.type.tensor_type.HasField('shape')}


def strip_prefix(model: onnx.ModelProto, prefix: str) -> None:
    """Drop the tracing wrapper's attribute name from initializer and node names (``model.x`` -> ``x``)."""
    renamed = {}
    for t in model.graph.initializer:
        if t.name.startswith(prefix + '.'):
            renamed[t.name] = t.name[len(prefix) + 1 :]
            t.name = renamed[t.name]
    for n in model.graph.node:
        n.input[:] = [renamed.get(i, i) for i in n.input]
        if n.name.startswith(f'/{prefix}/'):
            n.name = n.name[len(prefix) + 1 :]
    for i in model.graph.input:
        i.name = renamed.get(i.name, i.name)


def lower(model: onnx.ModelProto, forms: dict[int, Form], opset: int) -> Lowered:
    """Replace every marker in ``model`` (in place) by its form's ops; set the default opset to ``opset``."""
    g = _Graph(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    ranks = _ranks(model)
    result = Lowered()
    removed: set[int] = set()
    new_nodes: list[onnx.NodeProto] = []
    for n in model.graph.node:
        if id(n) in removed:
            continue
        if n.domain != MARKER_DOMAIN:
            new_nodes.append(n)
            continue
        idx = next(a.i for a in n.attribute if a.name == 'id')
        form = forms.get(idx)
        if isinstance(form, WeightForm):
            nodes, code = _lower_weight(g, n, form, consumers, removed)
        elif isinstance(form, UniformActForm):
            nodes, code = _lower_uniform(g, n, form, ranks.get(n.input[0]))
        elif isinstance(form, LogSqrt2Form):
            nodes, code = _lower_log_sqrt2(g, n, form)
        else:
            raise ExportError(f'marker {idx} has no integer form (internal error)')
        new_nodes.extend(nodes)
        calls = result.code_tensors.setdefault(idx, [])
        result.order.append((idx, len(calls)))
        calls.append(code)
        result.input_tensors.setdefault(idx, []).append(n.input[0])
    # nodes after a folded Transpose keep their order: the DQ replaces the marker's position
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    _drop_unused_initializers(model)
    for imp in list(model.opset_import):
        if imp.domain == MARKER_DOMAIN:
            model.opset_import.remove(imp)
        elif imp.domain in ('', 'ai.onnx'):
            imp.version = opset
    result.nodes = dict(g.added)
    return result


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    dropped = {t.name for t in model.graph.initializer if t.name not in used}
    keep = [t for t in model.graph.initializer if t.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    inputs = [i for i in model.graph.input if i.name not in dropped]  # (initializers listed as inputs)
    del model.graph.input[:]
    model.graph.input.extend(inputs)
