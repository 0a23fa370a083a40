"""MMEngine glue: the quantization hook, calibration data, reporting, checkpoint loading."""
from .calib_data import CalibSettings, build_calibration_batch
from .checkpoint import allow_mmengine_checkpoints, require_checkpoint
from .checkpoint_check import check_checkpoint_fits
from .ddp import CPUAwareDistributedDataParallel
from .hook import QuantizationHook

__all__ = ['CalibSettings', 'build_calibration_batch', 'allow_mmengine_checkpoints', 'require_checkpoint', 'check_checkpoint_fits',
           'CPUAwareDistributedDataParallel',
           'QuantizationHook']
