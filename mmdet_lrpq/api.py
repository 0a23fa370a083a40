"""``quantize_``: the one verb. Quantize any ``nn.Module`` in place and get its report back.

    import mmdet_lrpq
    report = mmdet_lrpq.quantize_(model, mmdet_lrpq.QuantConfig(w_bits=4, a_bits=4), calib=images)
    print(report)                      # per-site table and totals

``model``: an mmdet detector (calibration inputs are data batches, run through ``test_step``), a
timm Swin, or any module (inputs are passed to ``model(...)``). ``config``: a
:class:`~mmdet_lrpq.QuantConfig`, a bit plan (``BitPlan`` or its JSON path), or ``None`` with
the options as keyword arguments. ``calib``: an iterable of inputs (one calibration forward each,
streamed: memory does not grow with their number) or a callable ``calib(model)`` that runs the
calibration forward(s) itself (one calibration batch). With ``config.reconstruct`` the inputs are
read again after calibration, so ``calib`` must be re-iterable (a list, a tensor, a DataLoader) or a
callable (called again); a one-shot iterator is refused. The hook, ``init_quantized_detector`` and
``QuantSwinTransformer`` call the same driver.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sized
from typing import Any, Callable, Optional, Union

from torch import Tensor, nn

from .config import QuantConfig
from .models.quantizer import ModelQuantizer, QuantReport
from .models.state import StateFileError, load_state_file, save_state
from .plan import BitPlan

STATE_MISMATCH = ('error', 'recalibrate')
ConfigLike = Union[QuantConfig, BitPlan, str, os.PathLike, None]


def as_config(config: ConfigLike = None, **options) -> QuantConfig:
    """A ``QuantConfig`` from a config, a plan (object or path) or keyword options."""
    if isinstance(config, QuantConfig):
        if options:
            raise TypeError(f'give the options in the QuantConfig or as keywords, not both ({sorted(options)})')
        return config
    if config is not None:
        if 'plan' in options:
            raise TypeError('a plan was given twice (as config and as plan=)')
        options['plan'] = config
    return QuantConfig.from_options(options)


def default_runner(model: nn.Module) -> Callable[[nn.Module, Any], Any]:
    """How one calibration input is fed: mmdet data batches through ``test_step``, else ``model(...)``."""
    if hasattr(model, 'test_step') and hasattr(model, 'data_preprocessor'):
        return lambda m, batch: m.test_step(batch)

    def call(m: nn.Module, x: Any) -> Any:
        if isinstance(x, Mapping):
            return m(**x)
        if isinstance(x, tuple):
            return m(*x)
        return m(x)
    return call


def images_in(batch: Any) -> int:
    """Number of images in one calibration input (its weight in the mean across batches)."""
    if isinstance(batch, Mapping) and 'inputs' in batch:
        return len(batch['inputs'])
    if isinstance(batch, Tensor) and batch.dim() == 4:
        return batch.shape[0]
    return 1


def calibrate_or_load(quantizer: ModelQuantizer, calibrate: Callable[[], QuantReport], *,
                      state_file: Optional[str] = None, state_mismatch: str = 'error',
                      calibration: Optional[dict] = None) -> QuantReport:
    """Load ``state_file`` if it was made from these inputs, else calibrate (and save it).

    A mismatch or an unreadable file raises, naming the difference and the fix, unless
    ``state_mismatch='recalibrate'``: then a warning, a fresh calibration, and the file replaced.
    """
    if state_mismatch not in STATE_MISMATCH:
        raise ValueError(f'state_mismatch must be one of {STATE_MISMATCH}, got {state_mismatch!r}')
    log = quantizer.logger
    if state_file and os.path.isfile(state_file):
        try:
            state = load_state_file(state_file)
            report = quantizer.load_state(state, calibration, where=f'calibrated state {state_file}')
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


def quantize_(model: nn.Module, config: ConfigLike = None, calib: Union[Iterable, Callable[[nn.Module], Any], None] = None,
              *, state_file: Optional[str] = None, state_mismatch: str = 'error', calib_id: Optional[Any] = None,
              progress: bool = False, logger: Optional[logging.Logger] = None, **options) -> QuantReport:
    """Quantize ``model`` in place (see module docstring); returns the report.

    ``state_file``: save the calibrated state there, or load it instead of calibrating when it was
    made from the same weights, structure and options (see ``state_mismatch``). ``calib_id``: a
    description of the calibration data (e.g. dataset and image ids) recorded in the state and
    compared on load; without it the calibration inputs cannot be verified (a warning says so).
    The model is put in eval mode (post-training quantization is for inference).
    """
    if calib is None:
        raise ValueError('quantize_ needs calibration inputs: calib=[input, ...] (one forward each) or '
                         'calib=callable(model)')
    cfg = as_config(config, **options)
    one_call = callable(calib) and not isinstance(calib, (Iterable, Tensor))
    batches = [None] if one_call else [calib] if isinstance(calib, Tensor) else calib
    if cfg.reconstruct is not None and iter(batches) is batches:
        raise ValueError('reconstruction reads the calibration inputs again after calibration, but calib is a '
                         'one-shot iterator: pass a list of inputs (or a re-iterable such as a DataLoader), or a '
                         'callable calib(model)')
    model.eval()
    quantizer = ModelQuantizer(model, cfg, logger=logger)
    run = (lambda m, _: calib(m)) if one_call else default_runner(model)
    calibration = None if calib_id is None else {'calib_id': calib_id}

    def calibrate() -> QuantReport:
        bar = None
        if progress and not one_call:
            from tqdm import tqdm
            bar = tqdm(total=len(batches) if isinstance(batches, Sized) else None, desc='calibration', unit='batch')
        try:
            return quantizer.calibrate(batches, run, images_in=images_in, calibration=calibration,
                                       progress=None if bar is None else (lambda done: bar.update(1)),
                                       reconstruct_batches=lambda: batches, reconstruct_progress=progress)
        finally:
            if bar is not None:
                bar.close()

    return calibrate_or_load(quantizer, calibrate, state_file=state_file, state_mismatch=state_mismatch,
                             calibration=calibration)


__all__ = ['quantize_', 'as_config', 'calibrate_or_load', 'default_runner', 'images_in', 'STATE_MISMATCH']
