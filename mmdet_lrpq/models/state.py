"""Calibrated-state files that know what they were made from.

A state (the quantized model's tensors plus the report) is only valid for the float weights, the
model structure, the quantization options (with the bit plan's *content*, not its path) and the
calibration it was made with: the settings, and what was actually fed (a digest of the image
files and of their preprocessing, or of the calibration tensors). All of them are recorded as the state's
``identity`` and compared before a state is used: a plan regenerated at the same path, a state
saved with another checkpoint, or changed calibration settings are each a clear error naming the
difference (or, on request, a recalibration with a warning) — never a silent evaluation of
another model. Files are written atomically (temporary file + rename), so an interrupted save
leaves the previous file or none (the temporary file of a killed save is removed by the next save
or load), and an unreadable file is an error naming it and the fix.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..safe_load import remove_stale_temporaries, save_atomic
from ..version import __version__

if TYPE_CHECKING:
    from .quantizer import ModelQuantizer
    from .report import QuantReport

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


def _update_tensor(h: hashlib._Hash, t: torch.Tensor) -> None:
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


# recorded for the message only: the same images under another root are the same calibration
INFORMATIVE_FIELDS = ('calibration.image_paths',)


def differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Identity fields that differ, as ``field -> (saved, now)``; option dicts down to their keys."""
    out: dict[str, tuple[Any, Any]] = {}
    for key in IDENTITY_FIELDS:
        a, b = saved.get(key), now.get(key)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k) and f'{key}.{k}' not in INFORMATIVE_FIELDS:
                    out[f'{key}.{k}'] = (a.get(k), b.get(k))
        else:
            out[key] = (a, b)
    return out


_EXPLAIN = {
    'weights': 'the float weights differ (another checkpoint?)',
    'model_structure': 'the model is built differently (another config?)',
    'config.plan_sha256': "the bit plan's content changed (regenerated at the same path?)",
    'calibration.image_sha256': "the calibration images' content differs (another data root, or edited files?)",
    'calibration.pipeline_sha256': 'the calibration images are preprocessed differently (another test pipeline?)',
    'calibration.batches_sha256': 'other calibration inputs were given',
}
_DIGESTS = (
    'weights',
    'model_structure',
    'calibration.image_sha256',
    'calibration.pipeline_sha256',
    'calibration.batches_sha256',
)


def _paths(paths: Any, limit: int = 3) -> str:
    paths = list(paths or [])
    return ', '.join(paths[:limit]) + (f', ... ({len(paths)} in all)' if len(paths) > limit else '') or 'none recorded'


def mismatch_message(
    where: str, diffs: dict, path: str | None = None, saved: Mapping | None = None, now: Mapping | None = None
) -> str:
    """``where`` (e.g. ``'calibrated state x.pth'``) was made from other inputs: each difference, and the fix.

    ``path``: the state file, named in the fix; ``saved``/``now``: the identities (their calibration
    image paths are shown when the images' content differs).
    """
    lines = []
    for key, (a, b) in diffs.items():
        why = _EXPLAIN.get(key)
        if key in _DIGESTS and a is None:
            lines.append(f'{key}: not recorded in the state (made by an earlier version): it cannot be verified')
        elif key in _DIGESTS:
            lines.append(f'{key}: {why} (saved {str(a)[:12]}..., now {str(b)[:12]}...)')
        else:
            lines.append(f'{key}: saved {a!r}, now {b!r}' + (f' — {why}' if why else ''))
    if 'calibration.image_sha256' in diffs and saved is not None and now is not None:
        lines.append(
            f'calibration images: saved from {_paths((saved.get("calibration") or {}).get("image_paths"))}; '
            f'now {_paths((now.get("calibration") or {}).get("image_paths"))}'
        )
    fix = (
        f"Delete {path} to recalibrate, point state_file elsewhere, or set state_mismatch='recalibrate' "
        f'to recalibrate and overwrite it.'
        if path
        else 'Recalibrate (the state does not fit this run).'
    )
    return f'{where} was made from other inputs than this run:\n  - ' + '\n  - '.join(lines) + '\n' + fix


def check_identity(saved: Mapping, now: Mapping, where: str, path: str | None, logger: logging.Logger) -> None:
    """Raise :class:`StateMismatchError` unless a state of identity ``saved`` fits ``now`` (this run's).

    ``path``: the state's file, named in the fix. Calibration inputs this run cannot see
    (``calibration['unverifiable']`` names the fields and says why) are not compared: a warning says so.
    """
    diffs = differences(saved, now)
    if saved.get('calibration') is None or now.get('calibration') is None:
        diffs.pop('calibration', None)
        for key in [k for k in diffs if k.startswith('calibration.')]:
            diffs.pop(key)
        logger.warning(
            f'{where}: the calibration inputs cannot be compared (no calibration settings '
            f'recorded on one side); its weights, structure and options match'
        )
    else:
        unverifiable = [
            side['calibration']['unverifiable']
            for side in (saved, now)
            if isinstance(side['calibration'].get('unverifiable'), dict)
        ]
        fields = {f'calibration.{k}' for u in unverifiable for k in u['fields']}
        for key in fields | {'calibration.unverifiable'}:
            diffs.pop(key, None)
        if unverifiable:
            logger.warning(
                f"{where}: its calibration inputs cannot be compared with this run's "
                f'({"; ".join(u["reason"] for u in unverifiable)}); the settings, weights, '
                f'structure and options that can be compared match'
            )
    if diffs:
        raise StateMismatchError(mismatch_message(where, diffs, path, saved, now), diffs)
    if saved.get('package_version') != now['package_version']:
        logger.warning(
            f'{where} was made by mmdet-lrpq {saved.get("package_version")}, this is '
            f'{now["package_version"]}; recalibrate if results look off'
        )


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (read in blocks)."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def host_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` with every tensor copied to the CPU: a saved state loads on any device
    (the quantizers follow their inputs' device after loading)."""
    out = {}
    for key, value in model.state_dict().items():
        out[key] = value.detach().cpu() if torch.is_tensor(value) else value
    return out


def make_state(identity: dict | None, report: QuantReport | None, model: nn.Module) -> dict:
    """What a state file holds: ``identity``, the report and the calibrated ``model``'s tensors."""
    if identity is None or report is None or not report.calibration:
        raise RuntimeError('nothing to save: the model is not calibrated yet')
    return {
        'format': STATE_FORMAT,
        'identity': identity,
        'report': report.to_dict(),
        'state_dict': host_state_dict(model),
    }


def load_tensors(model: nn.Module, state_dict: Mapping[str, Any], device: torch.device, where: str) -> None:
    """Load a state's tensors into the wrapped ``model`` on ``device``: every one of them, or an error."""
    tensors = {k: v.to(device) if torch.is_tensor(v) else v for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise StateMismatchError(
            f'{where} does not fit this model: {len(missing)} missing, {len(unexpected)} '
            f'unexpected tensors (e.g. {(missing + unexpected)[:3]})',
            {},
        )


def save_state(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a partial file never takes the place of a good one."""
    save_atomic(state, path)


def load_state_file(path: str, map_location: Any = 'cpu') -> dict:
    """Read a state file, or raise :class:`StateFileError` naming the file and what to do."""
    fix = f"Delete {path} to recalibrate (or set state_mismatch='recalibrate')."
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise StateFileError(
            f'calibrated state {path} is unreadable ({type(err).__name__}: '
            f'{str(err).strip().splitlines()[0][:200] if str(err).strip() else "no detail"}); '
            f'it is truncated, corrupt or not a state file. {fix}'
        ) from None
    if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
        found = state.get('format') if isinstance(state, dict) else type(state).__name__
        raise StateFileError(
            f'{path} is not an mmdet-lrpq calibrated state of this version (format {found!r}, '
            f'expected {STATE_FORMAT!r}). {fix}'
        )
    return state


def new_identity(model: nn.Module, config_description: dict, calibration: dict | None) -> dict:
    """The identity of a state about to be made from ``model`` (call before wrapping it)."""
    return {
        'package_version': __version__,
        'model_structure': structure_fingerprint(model),
        'weights': weights_fingerprint(model),
        'config': config_description,
        'calibration': calibration,
    }


STATE_MISMATCH = ('error', 'recalibrate')  # what a state that does not fit does: stop, or recalibrate


def check_state_path(state_file: str) -> None:
    """Refuse, before any calibration, a ``state_file`` that could never be written."""
    path = os.fspath(state_file)
    if os.path.isdir(path):
        raise ValueError(
            f'state_file {path} is a directory; give the path of a file in it, e.g. '
            f'{os.path.join(path, "quant_state.pth")}'
        )
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f'state_file {path} cannot be written: {parent} is a file, not a directory')


def calibrate_or_load(
    quantizer: ModelQuantizer,
    calibrate: Callable[[], QuantReport],
    *,
    state_file: str | None = None,
    state_mismatch: str = 'error',
    calibration: dict | None = None,
) -> QuantReport:
    """Load ``state_file`` if it was made from these inputs, else calibrate (and save it).

    A mismatch or an unreadable file raises, naming the difference and the fix, unless
    ``state_mismatch='recalibrate'``: then a warning, a fresh calibration, and the file replaced.
    """
    if state_mismatch not in STATE_MISMATCH:
        raise ValueError(f'state_mismatch must be one of {STATE_MISMATCH}, got {state_mismatch!r}')
    log = quantizer.logger
    if state_file:
        check_state_path(state_file)
        for stale in remove_stale_temporaries(state_file):
            log.warning(f'removed {stale}: a temporary file left by an interrupted save of {state_file}')
    if state_file and os.path.isfile(state_file):
        try:
            state = load_state_file(state_file)
            report = quantizer.load_state(state, calibration, where=f'calibrated state {state_file}', path=state_file)
            log.info(f'loaded calibrated state from {state_file} (no calibration)')
            return report
        except StateFileError as err:
            if state_mismatch == 'error':
                raise
            log.warning(f'{err}\nrecalibrating (state_mismatch=recalibrate); {state_file} will be replaced')
    report = calibrate()
    if state_file:
        save_state(state_file, quantizer.state())
        log.info(f'calibrated state saved to {state_file}')
    return report
