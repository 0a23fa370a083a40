"""MMEngine glue: the quantization hook, calibration data, checkpoint loading, distributed testing."""

from ..safe_load import allow_mmengine_checkpoints, require_checkpoint
from .calib_data import CalibrationImages, CalibSettings
from .checkpoint_check import check_checkpoint_fits
from .ddp import CPUAwareDistributedDataParallel
from .hook import QuantizationHook
from .quantize import detector_of, quantize_detector

__all__ = [
    'CalibrationImages',
    'CalibSettings',
    'allow_mmengine_checkpoints',
    'require_checkpoint',
    'check_checkpoint_fits',
    'CPUAwareDistributedDataParallel',
    'QuantizationHook',
    'detector_of',
    'quantize_detector',
]
