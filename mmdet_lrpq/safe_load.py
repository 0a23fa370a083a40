"""Checkpoint files: existence checks, atomic writes, and MMEngine checkpoints under ``torch.load(weights_only=True)``.

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
import os.path as osp
import re
import socket
import tempfile
import time
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
        f'HistoryBuffer statistics methods are allowed'
    )


def _numpy_globals() -> list:
    """numpy pieces that pickled arrays/scalars reference, under numpy 1.x and 2.x names."""
    from numpy._core import multiarray  # numpy >= 2

    dtype_classes = [
        type(np.dtype(t))
        for t in (
            'bool',
            'int8',
            'int16',
            'int32',
            'int64',
            'uint8',
            'uint16',
            'uint32',
            'uint64',
            'float16',
            'float32',
            'float64',
        )
    ]
    entries: list = [np.ndarray, np.dtype, *dtype_classes]
    for module in ('numpy._core.multiarray', 'numpy.core.multiarray'):  # 2.x and 1.x pickles
        entries.append((multiarray._reconstruct, f'{module}._reconstruct'))
        entries.append((multiarray.scalar, f'{module}.scalar'))
    return entries


def allow_mmengine_checkpoints() -> None:
    """Allow-list what MMEngine stores in checkpoints (idempotent, process-wide)."""
    from mmengine.logging.history_buffer import HistoryBuffer

    torch.serialization.add_safe_globals(
        [
            HistoryBuffer,
            (_history_buffer_getattr, 'builtins.getattr'),
            (_history_buffer_getattr, '__builtin__.getattr'),
            *_numpy_globals(),
        ]
    )


def require_checkpoint(path: str | os.PathLike) -> str:
    """Fail early, with the fix, when a checkpoint path does not exist."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'checkpoint not found: {path!r}. Pass the path of a local .pth file (official mmdet-2.x '
            f'Swin checkpoints must first go through tools/convert_checkpoint.py).'
        )
    return path


# A temporary file names its writer (host and process): one left by a killed writer is recognised
# and removed by the next save or load of the same file, while a live writer's is left alone.
_LEGACY_TMP_AGE_S = 3600  # untagged temporaries of earlier versions: removed once this old


def _tmp_prefix(path: str) -> str:
    return f'{osp.basename(path)}.{socket.gethostname()}-{os.getpid()}.'


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Remove the temporary files that killed writes of ``path`` left next to it; returns their paths.

    Removed: those written on this host by a process that no longer runs, and untagged ones (from
    earlier versions) older than an hour. Another host's, or a running writer's, are kept.
    """
    path = os.fspath(path)
    directory, base = osp.dirname(osp.abspath(path)), osp.basename(path)
    tagged = re.compile(rf'^{re.escape(base)}\.(?P<host>.+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$')
    legacy = re.compile(rf'^{re.escape(base)}\.[a-z0-9_]{{8}}\.tmp$')
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    host = socket.gethostname()
    for name in names:
        full = osp.join(directory, name)
        m = tagged.match(name)
        if m:
            stale = m['host'] == host and not _pid_alive(int(m['pid']))
        else:
            try:
                stale = bool(legacy.match(name)) and time.time() - os.stat(full).st_mtime > _LEGACY_TMP_AGE_S
            except OSError:
                stale = False
        if stale:
            try:
                os.remove(full)
                removed.append(full)
            except OSError:
                pass
    return removed


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (temporary file in the same folder, fsync, rename):
    an interrupted write leaves the previous file, or none, never a partial one."""
    path = os.fspath(path)
    directory = osp.dirname(osp.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix='.tmp', dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
