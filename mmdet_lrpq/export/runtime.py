"""Run an exported graph in ONNX Runtime and hold it against the PyTorch model it came from.

* :func:`session` — an ONNX Runtime CPU session set up so that its QDQ fusion can pick integer
  kernels: ``MatMulAddFusion`` is disabled (it would turn ``DQ → MatMul → Add(bias)`` into a float
  ``Gemm`` before the QDQ fusion sees the ``MatMul``; with it off, ``MatMul`` with dequantized inputs
  becomes ``MatMulIntegerToFloat``: uint8 × int8 products, int32 sums).
* :func:`census` — what ONNX Runtime actually runs: integer kernels vs. products on dequantized
  (float) inputs, by site, read from the optimized graph it writes.
* :func:`output_parity` / :func:`code_parity` — outputs, and every quantizer's integer codes, of ONNX
  Runtime vs. PyTorch on the same input. Float sums in another order round differently by an ulp
  or so, which can move a value across a rounding boundary of the next quantizer: those codes then
  differ by one step, and the flips propagate. ``code_parity`` counts them per site, and also runs the
  model's own quantizer on the input ONNX Runtime gave each quantizer, which separates a wrong exported
  form from inherited rounding; :func:`disagreements` names the sites where the graph is not the model.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from .forms import LogSqrt2Form, UniformActForm, WeightForm, _codes_from_values
from .onnx_export import ExportResult

INTEGER_OPS = (
    'MatMulIntegerToFloat',
    'QLinearMatMul',
    'QLinearConv',
    'QGemm',
    'MatMulInteger',
    'ConvInteger',
    'DynamicQuantizeMatMul',
    'QAttention',
)
# float products; MatMulNBits (accuracy level 1) reads packed 4-bit weights but multiplies in float32
PRODUCT_OPS = ('MatMul', 'Gemm', 'Conv', 'FusedConv', 'FusedMatMul', 'FusedGemm', 'NhwcFusedConv', 'MatMulNBits')
DISABLED_OPTIMIZERS = ('MatMulAddFusion',)


def session(
    path_or_bytes,
    threads: int | None = None,
    profile: bool = False,
    optimized_path: str | None = None,
    disabled_optimizers=DISABLED_OPTIMIZERS,
    graph_optimization=None,
):
    """An ONNX Runtime CPU session (``threads``: intra-op threads; None = ONNX Runtime's default)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # A float MatMul on a DequantizeLinear'd 4-bit weight becomes MatMulNBits, which by default (accuracy
    # level 4) quantizes the *float* input to int8 on the fly: another model (measured: 7 % output error).
    # Level 1 keeps that input in float32.
    so.add_session_config_entry('session.qdq_matmulnbits_accuracy_level', '1')
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if profile:
        so.enable_profiling = True
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    if graph_optimization is not None:
        so.graph_optimization_level = graph_optimization
    return ort.InferenceSession(
        path_or_bytes, so, providers=['CPUExecutionProvider'], disabled_optimizers=list(disabled_optimizers)
    )


def run(sess, x: np.ndarray) -> list[np.ndarray]:
    return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})


def output_parity(reference: list[np.ndarray], outputs: list[np.ndarray], names: list[str]) -> list[dict]:
    """Per output: largest absolute difference, the same relative to the output's largest magnitude, and
    the fraction of elements that differ at all (bitwise) and beyond float noise (1e-4 of that magnitude)."""
    rows = []
    for name, ref, out in zip(names, reference, outputs):
        diff = np.abs(ref.astype(np.float64) - out.astype(np.float64))
        scale = float(np.abs(ref).max()) or 1.0
        rows.append(
            {
                'output': name,
                'shape': list(ref.shape),
                'max_abs_diff': float(diff.max()),
                'max_rel_diff': float(diff.max() / scale),
                'max_abs_value': scale,
                'frac_differing': float((ref != out).mean()),
                'frac_beyond_1e-4': float((diff > 1e-4 * scale).mean()),
            }
        )
    return rows


def _code_dtype(form) -> int:
    if isinstance(form, LogSqrt2Form):
        return TensorProto.INT32
    if isinstance(form, UniformActForm) and form.integer:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(_np_carrier(form.carrier.name)))
    return TensorProto.FLOAT


def _np_carrier(name: str):
    from .lower import _NP

    return _NP[name]


def _steps_torch(form, values: np.ndarray, axis_shape) -> np.ndarray:
    """PyTorch's quantized values in code units, comparable with :func:`_steps_onnx`."""
    if isinstance(form, LogSqrt2Form):
        return _codes_from_values(torch.from_numpy(values), torch.from_numpy(form.table)).numpy().astype(np.float64)
    steps = values.astype(np.float64) / form.scale.reshape(axis_shape).astype(np.float64)
    return np.round(steps) if form.integer else steps  # k·Δ / Δ is k up to the product's rounding


def _steps_onnx(form, codes: np.ndarray, axis_shape) -> np.ndarray:
    if isinstance(form, LogSqrt2Form):
        return codes.astype(np.float64)
    if form.integer:
        return (codes.astype(np.int64) - form.carrier_zp.reshape(axis_shape)).astype(np.float64)
    return codes.astype(np.float64)  # fractional zero point: the clipped x/Δ itself


def _axis_shape(form, ndim: int):
    if isinstance(form, UniformActForm) and form.axis is not None:
        shape = [1] * ndim
        shape[form.axis % ndim] = -1
        return shape
    return ()


def _step_diff(form, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.abs(a - b)
    if not (isinstance(form, LogSqrt2Form) or form.integer):
        d = np.where(d < 1e-3, 0.0, d)  # float x/Δ: the same floats, up to the division's rounding
    return d


def _input_steps(form, x: np.ndarray, axis_shape) -> np.ndarray:
    """A quantizer's input in steps, clipped to half a step beyond its range (values far outside the range
    quantize alike however they differ). Log-√2: in codes, ``-2·log2(x/Δ)`` clipped to ``[-0.5, 2^b + 0.5]``."""
    x = x.astype(np.float64)
    if isinstance(form, LogSqrt2Form):
        with np.errstate(divide='ignore'):
            t = -2.0 * np.log2(np.maximum(x, 0.0) / form.delta)
        return np.clip(t, -0.5, (1 << form.bits) + 0.5)
    scale = form.scale.reshape(axis_shape).astype(np.float64)
    zp = form.zero_point.reshape(axis_shape).astype(np.float64)
    return np.clip(x / scale, -zp - 0.5, form.levels - zp + 0.5)


def code_parity(result: ExportResult, model: torch.nn.Module, x: np.ndarray | None = None) -> dict:
    """Every activation quantizer's codes, ONNX Runtime vs. PyTorch, on ``x`` (default: the example input).

    Per site (each call of each quantizer, in graph order), three comparisons:

    * end to end (``differing``, ``frac_differing``, ``max_steps``): ONNX Runtime's codes vs PyTorch's,
      each runtime computing the quantizer's input itself. Float ops that round differently by an ulp
      flip a few codes by one step, and the flips propagate: deeper sites differ more, by several
      steps, in a correct graph too;
    * on the same input (``same_input_differing``, ``same_input_max_steps``): ONNX Runtime's codes vs
      the PyTorch quantizer applied to the very tensor ONNX Runtime fed that quantizer. This isolates
      the exported form (its scale, zero point, clip range, bits, log-√2 thresholds) from whatever its
      input inherited; a correct form gives PyTorch's codes exactly;
    * ``input_max_steps``: how far the quantizer's input differs between the runtimes, in steps of
      the quantizer (log-√2: in codes), both clipped to half a step beyond its range.

    Returns the rows, the totals, and ``disagreements``: :func:`disagreements` of the rows (empty when
    the graph computes what the model computes, up to float rounding).
    """
    x = result.example_input if x is None else x
    proto = onnx.load(result.path)
    graph_inputs = {i.name for i in proto.graph.input}
    requested: set[str] = {o.name for o in proto.graph.output}
    for idx, names in result.lowered.code_tensors.items():
        form = result.sites[idx].form
        if isinstance(form, WeightForm):
            continue
        for call, name in enumerate(names):
            proto.graph.output.append(helper.make_tensor_value_info(name, _code_dtype(form), None))
            inp = result.lowered.input_tensors[idx][call]
            if inp not in graph_inputs and inp not in requested:
                proto.graph.output.append(helper.make_tensor_value_info(inp, TensorProto.FLOAT, None))
                requested.add(inp)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'codes.onnx')
        onnx.save(proto, path)
        sess = session(path)
        outs = run(sess, x)
    ort = dict(zip([o.name for o in sess.get_outputs()], outs))
    ort.update({name: np.ascontiguousarray(x, dtype=np.float32) for name in graph_inputs})

    captured: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    hooks = []
    for idx, site in result.sites.items():
        if isinstance(site.form, WeightForm):
            continue
        hooks.append(
            site.quantizer.register_forward_hook(
                lambda mod, inp, out, idx=idx: captured.setdefault(idx, []).append(
                    (inp[0].detach().float().numpy().copy(), out.detach().float().numpy().copy())
                )
                and None
            )
        )
    modes = {m: m.training for m in model.modules()}
    model.eval()  # (dropout / drop path off, as in the exported graph)
    try:
        with torch.no_grad():
            model(torch.from_numpy(np.ascontiguousarray(x)))
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training
    rows, total, differing, worst, same_differing, same_worst = [], 0, 0, 0.0, 0, 0.0
    for idx, call in result.lowered.order:
        site = result.sites[idx]
        form = site.form
        if isinstance(form, WeightForm) or idx not in captured or call >= len(captured[idx]):
            continue
        ref_in, ref_out = captured[idx][call]
        ort_in = ort[result.lowered.input_tensors[idx][call]]
        codes = ort[result.lowered.code_tensors[idx][call]]
        axis_shape = _axis_shape(form, ref_out.ndim)
        b = _steps_onnx(form, codes, axis_shape)
        d = _step_diff(form, _steps_torch(form, ref_out, axis_shape), b)
        with torch.no_grad():  # the model's own quantizer on ONNX Runtime's input
            same = type(site.quantizer).forward(site.quantizer, torch.from_numpy(ort_in.copy())).float().numpy()
        ds = _step_diff(form, _steps_torch(form, same, axis_shape), b)
        di = np.abs(_input_steps(form, ref_in, axis_shape) - _input_steps(form, ort_in, axis_shape))
        n_diff, n_same = int((d > 0).sum()), int((ds > 0).sum())
        rows.append(
            {
                'site': site.name,
                'call': call,
                'bits': form.bits,
                'elements': int(d.size),
                'differing': n_diff,
                'frac_differing': n_diff / max(d.size, 1),
                'max_steps': float(d.max()) if d.size else 0.0,
                'same_input_differing': n_same,
                'same_input_frac_differing': n_same / max(d.size, 1),
                'same_input_max_steps': float(ds.max()) if ds.size else 0.0,
                'input_max_steps': float(di.max()) if di.size else 0.0,
            }
        )
        total += d.size
        differing += n_diff
        same_differing += n_same
        worst = max(worst, rows[-1]['max_steps'])
        same_worst = max(same_worst, rows[-1]['same_input_max_steps'])
    return {
        'sites': rows,
        'elements': total,
        'differing': differing,
        'frac_differing': differing / max(total, 1),
        'max_steps': worst,
        'sites_compared': len(rows),
        'same_input_differing': same_differing,
        'same_input_max_steps': same_worst,
        'disagreements': disagreements(rows),
    }


def disagreements(rows: list[dict], max_steps: float = 1.0, one_step_frac: float = 1e-4) -> list[str]:
    """Where the exported graph does not compute what the model computes (``code_parity``'s rows, graph
    order), each as a sentence naming the site; empty if none:

    * a quantizer whose codes differ from PyTorch's *on the same input* by more than ``max_steps``, or
      by one step at more than ``one_step_frac`` of its elements (float rounding cannot do that: both
      runtimes divide and round half to even, and the log-√2 form uses the exact thresholds);
    * a quantizer whose input differs from PyTorch's by more than ``max_steps`` while every quantizer
      before it in the graph gave PyTorch's codes exactly: the float ops in between (LayerNorm,
      reparameterized affine, softmax, GELU, sums, products) are not exported as the model runs them.

    End-to-end differences after a first one-step flip are not counted: each flip moves the next
    layers' inputs by a whole step, so they grow with depth in a correct graph too.
    """
    out = []
    clean = True  # no code has differed yet, in graph order
    for row in rows:
        where = row['site'] + (f' (call {row["call"] + 1})' if row.get('call') else '')
        if row['same_input_max_steps'] > max_steps or row['same_input_frac_differing'] > one_step_frac:
            out.append(
                f'{where} ({row["bits"]}-bit): {row["same_input_differing"]} of {row["elements"]} codes differ '
                f"from the model's quantizer on the same input, by up to {row['same_input_max_steps']:g} "
                f'step(s): the exported form is not this quantizer'
            )
        elif clean and row['input_max_steps'] > max_steps:
            out.append(
                f"{where} ({row['bits']}-bit): its input differs from the model's by "
                f"{row['input_max_steps']:.3g} steps although every earlier quantizer's codes agree: the "
                f'float ops before it are not exported as the model runs them'
            )
        clean = clean and row['differing'] == 0
    return out


def census(path: str, threads: int | None = None) -> dict:
    """What ONNX Runtime runs after its graph optimizations: integer kernels and float products by op type,
    and which float products read dequantized (quantized-site) inputs, by node name."""
    with tempfile.TemporaryDirectory() as tmp:
        opt = os.path.join(tmp, 'optimized.onnx')
        import onnxruntime as ort

        session(path, threads, optimized_path=opt, graph_optimization=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        g = onnx.load(opt).graph
    producers = {o: n for n in g.node for o in n.output}
    counts: dict[str, int] = {}
    integer, dequantized = [], []
    for n in g.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
        if n.op_type in INTEGER_OPS:
            integer.append(n.name)
        elif n.op_type in PRODUCT_OPS:
            if n.op_type == 'MatMulNBits' or any(
                producers.get(i) is not None and producers[i].op_type == 'DequantizeLinear' for i in n.input
            ):
                dequantized.append(n.name)
    return {
        'op_counts': dict(sorted(counts.items())),
        'integer_kernels': len(integer),
        'dequantized_products': len(dequantized),
        'integer_nodes': integer,
        'dequantized_nodes': dequantized,
    }


def profile_log_sqrt2(path: str, x: np.ndarray, threads: int | None = None, runs: int = 3) -> dict:
    """Share of ONNX Runtime's node time spent in the exact log-√2 quantizer ops (nodes named lrpq_log_sqrt2/)."""
    import json

    sess = session(path, threads, profile=True)
    for _ in range(runs):
        run(sess, x)
    prof = sess.end_profiling()
    with open(prof) as f:
        events = json.load(f)
    os.remove(prof)
    total = log = 0
    for e in events:
        if e.get('cat') == 'Node' and e.get('name', '').endswith('_kernel_time'):
            total += e['dur']
            if 'lrpq_log_sqrt2' in e['name']:
                log += e['dur']
    return {'node_time_us': total / runs, 'log_sqrt2_us': log / runs, 'log_sqrt2_share': log / total if total else 0.0}


__all__ = [
    'session',
    'run',
    'output_parity',
    'code_parity',
    'disagreements',
    'census',
    'profile_log_sqrt2',
    'INTEGER_OPS',
]
