"""Pure-PyTorch quantization core: RepQ-exact quantizers, fake-quant modules, CRL, calibration.

:func:`wrap_modules` swaps layers by type (configured per layer), :func:`calibrate_stream`
calibrates them on any number of batches (:func:`calibrate` on one), :func:`reparameterize_`
applies RepQ/CRL, :func:`smooth_` MPTQ-ViT's SQ-b, :func:`reconstruct_` optionally learns rounding and step sizes afterwards. No MMDetection imports here; :func:`mmdet_lrpq.quantize_` drives it all.
"""

from .calibrate import RULE as CALIBRATION_RULE
from .calibrate import activation_quantizers, calibrate, calibrate_stream, calibrating, thin_channel_ranges
from .functional import (
    PERCENTILES,
    check_bits,
    fake_quant_log_sqrt2,
    fake_quant_regions,
    fake_quant_uniform,
    log_sqrt2_qparams,
    region_qparams,
    uniform_qparams,
)
from .integer_form import log2_shift_dequant, log2_shift_form, log2_shift_matmul_int
from .modules import (
    LogSqrt2Quantizer,
    QuantConv2d,
    QuantLinear,
    QuantMatMul,
    QuantModule,
    QuantState,
    RegionUniformQuantizer,
    UniformQuantizer,
    quant_modules,
    set_quant_state,
)
from .reconstruct import reconstruct_
from .reconstruct_config import ReconstructConfig
from .reconstruct_units import Unit
from .reparam import ReparamResult, crl_clip, reparameterize_
from .smooth import SmoothResult, recording_ranges, smooth_
from .wrap import LayerQuantConfig, quantizable_layers, set_submodule, wrap_modules

__all__ = [
    'PERCENTILES',
    'check_bits',
    'uniform_qparams',
    'fake_quant_uniform',
    'log_sqrt2_qparams',
    'fake_quant_log_sqrt2',
    'log2_shift_form',
    'log2_shift_dequant',
    'log2_shift_matmul_int',
    'QuantState',
    'UniformQuantizer',
    'LogSqrt2Quantizer',
    'QuantModule',
    'QuantLinear',
    'QuantConv2d',
    'QuantMatMul',
    'RegionUniformQuantizer',
    'fake_quant_regions',
    'region_qparams',
    'SmoothResult',
    'recording_ranges',
    'smooth_',
    'quant_modules',
    'set_quant_state',
    'calibrate',
    'calibrate_stream',
    'calibrating',
    'activation_quantizers',
    'thin_channel_ranges',
    'CALIBRATION_RULE',
    'ReparamResult',
    'crl_clip',
    'reparameterize_',
    'LayerQuantConfig',
    'quantizable_layers',
    'set_submodule',
    'wrap_modules',
    'ReconstructConfig',
    'Unit',
    'reconstruct_',
]
