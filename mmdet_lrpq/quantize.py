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

import hashlib
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any, cast

from torch import Tensor, nn

from .config import QuantConfig
from .models.quantizer import ModelQuantizer, images_in
from .models.report import QuantReport
from .models.state import _update_tensor, calibrate_or_load
from .plan import BitPlan

_EMPTY = object()
ConfigLike = QuantConfig | BitPlan | str | os.PathLike | None


def as_config(config: ConfigLike = None, **options: Any) -> QuantConfig:
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

        def test_step(m: Any, batch: Any) -> Any:
            return m.test_step(batch)

        return test_step

    def call(m: nn.Module, x: Any) -> Any:
        if isinstance(x, Mapping):
            return m(**x)
        if isinstance(x, tuple):
            return m(*x)
        return m(x)

    return call


def _what(x: Any) -> str:
    """A short description of a calibration input, for error messages."""
    if isinstance(x, Tensor):
        return f'a tensor of shape {tuple(x.shape)} and dtype {x.dtype}'
    if isinstance(x, (str, bytes, os.PathLike)):
        return f'a {type(x).__name__} ({str(x)[:80]!r})'
    if isinstance(x, Mapping):
        return f'a dict with keys {sorted(map(str, x))[:6]}'
    if isinstance(x, (list, tuple)):
        return f'a {type(x).__name__} of {len(x)} item(s)' + (f', the first {_what(x[0])}' if x else '')
    return f'a {type(x).__name__}'


def _image_layer(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The model's first layer with weights, when it is a Conv2d (it then takes the images)."""
    for name, module in model.named_modules():
        if next(module.children(), None) is None and next(module.parameters(recurse=False), None) is not None:
            return (name, module) if isinstance(module, nn.Conv2d) else None
    return None


def check_calibration_input(model: nn.Module, batch: Any) -> None:
    """Refuse a first calibration input the model cannot take, saying what was given and what it expects
    (instead of an error from deep inside torch or timm after the model was wrapped)."""
    where = 'the first calibration input (calib[0])'
    if hasattr(model, 'test_step') and hasattr(model, 'data_preprocessor'):
        if not (isinstance(batch, Mapping) and 'inputs' in batch):
            raise ValueError(
                f'{where} is {_what(batch)}; an mmdet detector calibrates on data batches as its '
                f'test_step takes them, dict(inputs=[CHW image tensor, ...], data_samples=[...]) '
                f'(e.g. from its test dataloader), or use init_quantized_detector / QuantizationHook, '
                f'which make them from the config'
            )
        if len(batch['inputs']) == 0:
            raise ValueError(f'{where} holds no images (empty inputs); give at least one image per batch')
        return
    if batch is None or isinstance(batch, (str, bytes, os.PathLike, int, float, bool)):
        raise ValueError(
            f'{where} is {_what(batch)}; calib takes what the model takes (e.g. image tensors '
            f'[N, C, H, W], tuples of positional or dicts of keyword arguments), not file names: '
            f'load and preprocess the images first'
        )
    tensors = (
        [batch]
        if isinstance(batch, Tensor)
        else [
            v
            for v in (batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, tuple) else [])
            if isinstance(v, Tensor)
        ]
    )
    if any(t.numel() == 0 for t in tensors):
        raise ValueError(f'{where} is empty ({_what(batch)}); give at least one image per calibration batch')
    layer = _image_layer(model)
    if not isinstance(batch, Tensor) or layer is None:
        return
    name, conv = layer
    c = conv.in_channels
    if batch.dim() != 4 or batch.shape[1] != c:
        hint = ''
        if batch.dim() == 3 and batch.shape[0] == c:
            hint = ': add the batch dimension, x.unsqueeze(0)'
        elif batch.dim() == 4 and batch.shape[-1] == c:
            hint = ': channels last? x.permute(0, 3, 1, 2)'
        elif batch.dim() == 4 and batch.shape[1] == 1:
            hint = f': greyscale? give the {c}-channel images the model was trained on'
        raise ValueError(
            f"{where} is {_what(batch)}; this model's first layer ({name}, Conv2d with {c} input "
            f'channels) takes images as [N, {c}, H, W]{hint}'
        )
    if not batch.is_floating_point():
        raise ValueError(
            f'{where} is {_what(batch)}; the model takes floating-point images, normalised as in '
            f'training (e.g. x.float() / 255 and the mean/std of its transform)'
        )


def _constant_images(batch: Any) -> int:
    """How many images of a batch of [N, C, H, W] tensors are one colour everywhere."""
    x = batch if isinstance(batch, Tensor) else None
    if x is None or x.dim() != 4 or not x.numel():
        return 0
    return int((x.amax((-2, -1)) == x.amin((-2, -1))).all(1).sum())


def _refuse_constant(batches: Iterable, logger: logging.Logger) -> Iterator:
    """``batches``, warning about constant images; the stream fails at its end if every image was constant."""
    constant = total = 0
    for i, batch in enumerate(batches):
        n = _constant_images(batch)
        if n:
            logger.warning(
                f'calibration input {i}: {n} image(s) are constant (one colour everywhere); they carry '
                f'no information for the activation ranges'
            )
        constant += n
        total += images_in(batch)
        yield batch
    if total and constant == total:
        raise ValueError(
            'every calibration image is constant (e.g. all zeros): the activation ranges collapse and '
            'the quantized model would be meaningless (a classifier drops to chance). Calibrate on '
            'real images, preprocessed as the model expects'
        )


def _update_input(h: hashlib._Hash, x: Any) -> bool:
    """Feed one calibration input to ``h``; False if it holds something that cannot be digested."""
    if isinstance(x, Tensor):
        _update_tensor(h, x)
    elif isinstance(x, Mapping):
        for key in sorted(x, key=str):
            h.update(repr(key).encode())
            if not _update_input(h, x[key]):
                return False
    elif isinstance(x, (list, tuple)):
        h.update(f'{type(x).__name__}{len(x)}'.encode())
        return all(_update_input(h, v) for v in x)
    elif x is None or isinstance(x, (bool, int, float, str)):
        h.update(repr(x).encode())
    else:
        return False
    return True


def calibration_record(batches: Any, calib_id: Any) -> dict:
    """What a state records about ``quantize_``'s calibration inputs: ``calib_id`` as given, and the sha256
    of the inputs themselves when they are a list or a tensor (a stream or a callable cannot be read twice)."""
    record: dict = {} if calib_id is None else {'calib_id': calib_id}
    h = hashlib.sha256()
    if isinstance(batches, (list, tuple)) and _update_input(h, list(batches)):
        record['batches_sha256'] = h.hexdigest()
    else:
        record['unverifiable'] = {
            'fields': ['batches_sha256'],
            'reason': 'calib is a callable or a stream, whose inputs cannot be digested',
        }
    return record


def quantize_(
    model: nn.Module,
    config: ConfigLike = None,
    calib: Iterable | Callable[[nn.Module], Any] | None = None,
    *,
    state_file: str | None = None,
    state_mismatch: str = 'error',
    calib_id: Any | None = None,
    progress: bool = False,
    logger: logging.Logger | None = None,
    **options: Any,
) -> QuantReport:
    """Quantize ``model`` in place (see module docstring); returns the report.

    ``state_file``: save the calibrated state there, or load it instead of calibrating when it was
    made from the same weights, structure, options and calibration inputs (see ``state_mismatch``):
    inputs given as a list or a tensor are compared by content digest; ``calib_id``, a description of
    the calibration data (e.g. dataset and image ids), is recorded and compared too, and is the only
    check for a callable or a stream (whose inputs cannot be digested: a warning says so).
    The model is put in eval mode (post-training quantization is for inference).
    """
    if calib is None:
        raise ValueError(
            'quantize_ needs calibration inputs: calib=[input, ...] (one forward each) or calib=callable(model)'
        )
    if isinstance(calib, (str, bytes, os.PathLike)):
        raise ValueError(
            f'calib is {_what(calib)}: quantize_ takes the calibration inputs themselves (e.g. a '
            f'list of image tensors [N, C, H, W]), not a path; load and preprocess the images first'
        )
    cfg = as_config(config, **options)
    one_call = callable(calib) and not isinstance(calib, (Iterable, Tensor))
    batches: Any = [None] if one_call else [calib] if isinstance(calib, Tensor) else calib  # inputs as given
    for option, what in (('reconstruct', 'reconstruction'), ('smooth', 'SQ-b smoothing')):
        if getattr(cfg, option) is not None and iter(batches) is batches:
            raise ValueError(
                f'{what} reads the calibration inputs again, but calib is a one-shot iterator: pass '
                f'a list of inputs (or a re-iterable such as a DataLoader), or a callable calib(model)'
            )
    if not one_call:
        if iter(batches) is batches:  # a stream: look at its first input and put it back
            first = next(batches, _EMPTY)
            batches = itertools.chain([] if first is _EMPTY else [first], batches)
        else:
            first = next(iter(batches), _EMPTY)
        if first is _EMPTY:
            raise ValueError('calib is empty: give at least one calibration input')
        check_calibration_input(model, first)
    model.eval()
    quantizer = ModelQuantizer(model, cfg, logger=logger)
    run = (lambda m, _: cast(Callable[[nn.Module], Any], calib)(m)) if one_call else default_runner(model)
    calibration = calibration_record(None if one_call else batches, calib_id)

    def calibrate() -> QuantReport:
        bar = None
        if progress and not one_call:
            from tqdm import tqdm

            bar = tqdm(total=len(batches) if isinstance(batches, Sized) else None, desc='calibration', unit='batch')
        try:
            stream = batches if one_call else _refuse_constant(batches, quantizer.logger)
            return quantizer.calibrate(
                stream,
                run,
                images_in=images_in,
                calibration=calibration,
                progress=None if bar is None else (lambda done: bar.update(1)),
                reconstruct_batches=lambda: batches,
                reconstruct_progress=progress,
            )
        finally:
            if bar is not None:
                bar.close()

    return calibrate_or_load(
        quantizer, calibrate, state_file=state_file, state_mismatch=state_mismatch, calibration=calibration
    )


__all__ = ['quantize_', 'as_config', 'default_runner']
