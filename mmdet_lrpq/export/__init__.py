"""The integer form of a quantized model: ONNX QDQ graphs that standard runtimes execute.

    from mmdet_lrpq.export import export_onnx, session, run, output_parity, code_parity
    result = export_onnx(quantized_module, 'model.onnx', example_input)     # opset 21, int4/int8 weights
    outputs = run(session(result.path), result.example_input)              # ONNX Runtime (CPU)
    print(output_parity(result.torch_outputs, outputs, result.output_names))

Needs ``onnx`` and ``onnxruntime`` (pinned in ``requirements/runtime.txt``); ``import mmdet_lrpq``
never imports this package. :mod:`.detector` exports a detector's backbone + neck and evaluates the
detector with ONNX Runtime computing them.
"""

from .forms import ExportError
from .onnx_export import MAX_OPSET, MIN_OPSET, ExportResult, check_quantized, export_onnx
from .runtime import census, code_parity, output_parity, profile_log_sqrt2, run, session

__all__ = [
    'export_onnx',
    'ExportResult',
    'ExportError',
    'check_quantized',
    'session',
    'run',
    'output_parity',
    'code_parity',
    'census',
    'profile_log_sqrt2',
    'MIN_OPSET',
    'MAX_OPSET',
]
