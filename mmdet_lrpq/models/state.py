"""Calibrated-state files that know what they were made from.

A state (the quantized model's tensors plus the report) is only valid for the float weights, the
model structure, the quantization options (with the bit plan's *content*, not its path) and the
calibration settings it was calibrated with. All of them are recorded as the state's
``identity`` and compared before a state is used: a plan regenerated at the same path, a state
saved with another checkpoint, or changed calibration settings are each a clear error naming the
difference (or, on request, a recalibration with a warning) — never a silent evaluation of
another model. Files are written atomically (temporary file + rename), so an interrupted save
leaves the previous file or none, and an unreadable file is an error naming it and the fix.
"""
from __future__ import annotations

import hashlib
import os
import os.path as osp
import tempfile
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..version import __version__

STATE_FORMAT = 'mmdet-lrpq/quant-state@2'
# compared before a state is used; 'package_version' only warns (formats are versioned separately)
IDENTITY_FIELDS = ('model_structure', 'weights', 'config', 'calibration')


class StateFileError(ValueError):
    """A state file that cannot be used as it is (unreadable, foreign, or made from other inputs)."""


class StateMismatchError(StateFileError):
    """The state was made from other weights, structure, options or calibration settings."""

    def __init__(self, message: str, differences: dict):
        super().__init__(message)
        self.differences = differences


def _update_tensor(h: 'hashlib._Hash', t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f'{t.dtype}{tuple(t.shape)}'.encode())
    if t.numel():
        h.update(t.to('cpu').contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of every tensor of the float model's state dict (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        if torch.is_tensor(value):
            _update_tensor(h, value)
    return h.hexdigest()


def structure_fingerprint(model: nn.Module) -> str:
    """sha256 of the module tree (paths and types) and the state dict's names and shapes."""
    h = hashlib.sha256()
    for name, module in model.named_modules():
        h.update(f'{name}:{type(module).__module__}.{type(module).__qualname__};'.encode())
    for name, value in model.state_dict().items():
        if torch.is_tensor(value):
            h.update(f'{name}:{value.dtype}{tuple(value.shape)};'.encode())
    return h.hexdigest()


def differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Identity fields that differ, as ``field -> (saved, now)``; option dicts down to their keys."""
    out: dict[str, tuple[Any, Any]] = {}
    for key in IDENTITY_FIELDS:
        a, b = saved.get(key), now.get(key)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    out[f'{key}.{k}'] = (a.get(k), b.get(k))
        else:
            out[key] = (a, b)
    return out


_EXPLAIN = {
    'weights': 'the float weights differ (another checkpoint?)',
    'model_structure': 'the model is built differently (another config?)',
    'config.plan_sha256': 'the bit plan\'s content changed (regenerated at the same path?)',
}


def mismatch_message(path: str, diffs: dict) -> str:
    lines = []
    for key, (saved, now) in diffs.items():
        why = _EXPLAIN.get(key)
        if key in ('weights', 'model_structure'):
            lines.append(f'{key}: {why} (saved {str(saved)[:12]}..., now {str(now)[:12]}...)')
        else:
            lines.append(f'{key}: saved {saved!r}, now {now!r}' + (f' — {why}' if why else ''))
    return (f'calibrated state {path} was made from other inputs than this run:\n  - ' + '\n  - '.join(lines) +
            f"\nDelete {path} to recalibrate, point state_file elsewhere, or set state_mismatch='recalibrate' "
            f'to recalibrate and overwrite it.')


def host_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` with every tensor copied to the CPU: a saved state loads on any device
    (the quantizers follow their inputs' device after loading)."""
    out = {}
    for key, value in model.state_dict().items():
        out[key] = value.detach().cpu() if torch.is_tensor(value) else value
    return out


def save_state(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a partial file never takes the place of a good one."""
    path = os.fspath(path)
    directory = osp.dirname(osp.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=osp.basename(path) + '.', suffix='.tmp', dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


def load_state_file(path: str, map_location: Any = 'cpu') -> dict:
    """Read a state file, or raise :class:`StateFileError` naming the file and what to do."""
    fix = f'Delete {path} to recalibrate (or set state_mismatch=\'recalibrate\').'
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 -- truncated zip, pickle errors, foreign objects: all unusable
        raise StateFileError(f'calibrated state {path} is unreadable ({type(err).__name__}: '
                             f'{str(err).strip().splitlines()[0][:200] if str(err).strip() else "no detail"}); '
                             f'it is truncated, corrupt or not a state file. {fix}') from None
    if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
        found = state.get('format') if isinstance(state, dict) else type(state).__name__
        raise StateFileError(f'{path} is not an mmdet-lrpq calibrated state of this version (format {found!r}, '
                             f'expected {STATE_FORMAT!r}). {fix}')
    return state


def new_identity(model: nn.Module, config_description: dict,
                 calibration: Optional[dict]) -> dict:
    """The identity of a state about to be made from ``model`` (call before wrapping it)."""
    return {'package_version': __version__, 'model_structure': structure_fingerprint(model),
            'weights': weights_fingerprint(model), 'config': config_description, 'calibration': calibration}
