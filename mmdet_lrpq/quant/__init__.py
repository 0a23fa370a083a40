"""Pure-PyTorch quantization core: RepQ-exact quantizers, fake-quant modules, CRL, calibration.

The one in-place verb is :func:`wrap_modules` (swap layers by type, configured per layer),
followed by :func:`calibrate` and :func:`reparameterize_`. No MMDetection imports here.
"""
from .calibrate import calibrate, calibrating
from .functional import (PERCENTILES, check_bits, fake_quant_log_sqrt2, fake_quant_uniform,
                         log2_shift_dequant, log2_shift_form, log2_shift_matmul_int, log_sqrt2_qparams,
                         uniform_qparams)
from .modules import (LogSqrt2Quantizer, QuantConv2d, QuantLinear, QuantMatMul, QuantModule, QuantState,
                      UniformQuantizer, quant_modules, set_quant_state)
from .reparam import ReparamResult, crl_clip, reparameterize_
from .wrap import LayerQuantConfig, quantizable_layers, set_submodule, wrap_modules

__all__ = [
    'PERCENTILES', 'check_bits', 'uniform_qparams', 'fake_quant_uniform', 'log_sqrt2_qparams',
    'fake_quant_log_sqrt2', 'log2_shift_form', 'log2_shift_dequant', 'log2_shift_matmul_int',
    'QuantState', 'UniformQuantizer', 'LogSqrt2Quantizer', 'QuantModule', 'QuantLinear', 'QuantConv2d',
    'QuantMatMul', 'quant_modules', 'set_quant_state', 'calibrate', 'calibrating', 'ReparamResult',
    'crl_clip', 'reparameterize_', 'LayerQuantConfig', 'quantizable_layers', 'set_submodule',
    'wrap_modules',
]
