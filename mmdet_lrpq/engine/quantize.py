"""Quantize an mmdet detector from its config: the one path behind the hook and ``init_quantized_detector``.

Calibration images come from the config's test dataset settings (:mod:`.calib_data`), stream
through ``test_step`` ``calib.batch_size`` at a time, and the calibrated state can be saved and
reused (:func:`mmdet_lrpq.models.state.calibrate_or_load`: refused, or recalibrated, when it was made from
other weights, options, calibration settings or calibration images — their content is digested).
Under distributed testing rank 0 calibrates (or loads) and every rank receives the same state, so
every rank evaluates the quantized model.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

from ..config import QuantConfig
from ..models.quantizer import ModelQuantizer, images_in
from ..models.report import QuantReport
from ..models.state import calibrate_or_load
from .calib_data import CalibrationImages, CalibSettings, pipeline_digest


def detector_of(model: nn.Module) -> nn.Module:
    """The detector inside the runner's model: unwraps DDP and test-time augmentation wrappers."""
    from mmengine.model import BaseTTAModel, is_model_wrapper

    if is_model_wrapper(model):
        model = model.module
    if isinstance(model, BaseTTAModel):
        model = model.module  # calibrated on the plain (first) variant of the TTA pipeline
    return model


def quantize_detector(
    model: nn.Module,
    cfg: Any,
    config: QuantConfig,
    calib: CalibSettings,
    *,
    state_file: str | None = None,
    state_mismatch: str = 'error',
    logger: logging.Logger | None = None,
    progress: bool = True,
) -> QuantReport:
    """Quantize ``model`` (a built detector with its weights) in place; returns the report."""
    from mmengine.dist import broadcast_object_list, get_dist_info

    logger = logger or logging.getLogger('mmdet_lrpq')
    quantizer = ModelQuantizer(model, config, logger=logger)
    backbone = getattr(model, 'backbone', None)
    if hasattr(backbone, 'claim_quantization'):
        backbone.claim_quantization()
    found = calibration_images(cfg, calib, logger, state_file)
    identity = calibration_identity(cfg, calib, found)

    def calibrate() -> QuantReport:
        images = (
            found
            if isinstance(found, CalibrationImages)
            else CalibrationImages(cfg.test_dataloader.dataset, calib, logger)
        )
        where = calib.source + (f' ({calib.ann_file})' if calib.ann_file else '')
        how = 'as given by calib.image_ids' if calib.image_ids is not None else f'seed {calib.seed}'
        logger.info(
            f'calibrating on {len(images)} image(s) of {where}, ids {images.ids} ({how}), '
            f'{calib.batch_size} per forward'
        )
        model.eval()
        shape: list = []
        # the padded network input of the first batch, as the data preprocessor makes it (for BOPs)
        handle = model.data_preprocessor.register_forward_hook(
            lambda module, args, out: shape.append(tuple(out['inputs'].shape[-2:]))
        )

        bar = _progress_bar(len(images)) if progress else None
        try:
            report = quantizer.calibrate(
                images.batches(),
                lambda m, batch: m.test_step(batch),
                images_in=images_in,
                image_ids=images.ids,
                calibration=identity,
                batch_size=calib.batch_size,
                progress=None if bar is None else bar.update_to,
                reconstruct_batches=images.batches,
                reconstruct_progress=progress,
            )
        finally:
            handle.remove()
            if bar is not None:
                bar.close()
        report.input_shape = shape[0]
        return report

    rank, world_size = get_dist_info()
    if world_size == 1:
        return calibrate_or_load(
            quantizer, calibrate, state_file=state_file, state_mismatch=state_mismatch, calibration=identity
        )
    state = [None]
    if rank == 0:
        calibrate_or_load(
            quantizer, calibrate, state_file=state_file, state_mismatch=state_mismatch, calibration=identity
        )
        state = [quantizer.state()]
    broadcast_object_list(state, src=0)
    if rank != 0:
        quantizer.load_state(state[0], identity, where='the calibrated state broadcast by rank 0')
    return quantizer.report


def calibration_images(
    cfg: Any, calib: CalibSettings, logger: logging.Logger, state_file: str | None = None
) -> CalibrationImages | FileNotFoundError:
    """The chosen calibration images; or, when they are missing here but a state file exists (it may
    have been calibrated elsewhere), the error saying why (the state is then used unverified, with a warning)."""
    try:
        return CalibrationImages(cfg.test_dataloader.dataset, calib, logger)
    except FileNotFoundError as err:
        if state_file and os.path.isfile(state_file):
            return err
        raise


def calibration_identity(cfg: Any, calib: CalibSettings, images: CalibrationImages | FileNotFoundError) -> dict:
    """A calibrated state's record of its calibration: the settings, and what was actually fed (the
    images' resolved paths and content digest, the pipeline's digest), compared when a state is loaded."""
    if isinstance(images, CalibrationImages):
        return {**calib.describe(), **images.identity()}
    return {
        **calib.describe(),
        'pipeline_sha256': pipeline_digest(cfg.test_dataloader.dataset, calib),
        'unverifiable': {
            'fields': ['image_paths', 'image_sha256'],
            'reason': f'calibration images not found here: {images}',
        },
    }


class _progress_bar:
    """tqdm on stderr, fed with the number of images done."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc='calibration', unit='img', leave=False)

    def update_to(self, done: float) -> None:
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        self._bar.close()
