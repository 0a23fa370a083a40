"""Checkpoint files: existence checks, and MMEngine checkpoints under ``torch.load(weights_only=True)``.

torch >= 2.6 refuses any pickled global that is not allow-listed. Checkpoints written by
MMEngine's ``Runner`` carry, besides tensors, a ``message_hub`` with ``HistoryBuffer`` objects
(numpy arrays inside, and the class' statistics methods pickled as ``getattr(HistoryBuffer,
'min')``) and numpy scalars in ``meta``. Rather than switching the check off, we allow-list
exactly those types; ``getattr`` itself is replaced by a version that resolves nothing but
HistoryBuffer's statistics methods, so a malicious file still cannot reach arbitrary attributes.
MMEngine is imported only by :func:`allow_mmengine_checkpoints`, so pure paths (timm-only planning)
can use :func:`require_checkpoint` without it.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

_HISTORY_BUFFER_STATISTICS = frozenset({'min', 'max', 'mean', 'current'})


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """Stand-in for ``builtins.getattr`` during weights-only unpickling."""
    from mmengine.logging.history_buffer import HistoryBuffer
    if obj is HistoryBuffer and name in _HISTORY_BUFFER_STATISTICS:
        return getattr(HistoryBuffer, name)
    raise torch.serialization.pickle.UnpicklingError(
        f'refusing getattr({obj!r}, {name!r}) in a weights-only checkpoint load; only '
        f'HistoryBuffer statistics methods are allowed')


def _numpy_globals() -> list:
    """numpy pieces that pickled arrays/scalars reference, under numpy 1.x and 2.x names."""
    from numpy._core import multiarray  # numpy >= 2
    dtype_classes = [type(np.dtype(t)) for t in
                     ('bool', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32',
                      'uint64', 'float16', 'float32', 'float64')]
    entries: list = [np.ndarray, np.dtype, *dtype_classes]
    for module in ('numpy._core.multiarray', 'numpy.core.multiarray'):  # 2.x and 1.x pickles
        entries.append((multiarray._reconstruct, f'{module}._reconstruct'))
        entries.append((multiarray.scalar, f'{module}.scalar'))
    return entries


def allow_mmengine_checkpoints() -> None:
    """Allow-list what MMEngine stores in checkpoints (idempotent, process-wide)."""
    from mmengine.logging.history_buffer import HistoryBuffer
    torch.serialization.add_safe_globals([
        HistoryBuffer,
        (_history_buffer_getattr, 'builtins.getattr'),
        (_history_buffer_getattr, '__builtin__.getattr'),
        *_numpy_globals(),
    ])


def require_checkpoint(path: str | os.PathLike) -> str:
    """Fail early, with the fix, when a checkpoint path does not exist."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'checkpoint not found: {path!r}. Pass the path of a local .pth file (official mmdet-2.x '
            f'Swin checkpoints must first go through tools/convert_checkpoint.py).')
    return path
