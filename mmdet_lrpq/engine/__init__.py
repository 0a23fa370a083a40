"""MMEngine glue: the quantization hook, calibration data, reporting, checkpoint loading."""
from .checkpoint import allow_mmengine_checkpoints, require_checkpoint

__all__ = ['allow_mmengine_checkpoints', 'require_checkpoint']
