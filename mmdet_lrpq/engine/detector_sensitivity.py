"""The detector side of the measured-sensitivity allocator: its own task loss on the calibration images.

:func:`mmdet_lrpq.models.fisher.fisher_sensitivity` needs a loss; for an mmdet detector it is
the detector's training loss (``model.loss``: RPN and RoI-head classification, box and mask terms)
on the calibration images and their annotations — the same images, chosen the same way, as the
``QuantizationHook`` calibrates on. The sites, the per-channel inputs and the pinned patch-embedding
bits come from the same driver that quantizes, so the table names exactly the sites a plan must cover.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..models.fisher import fisher_sensitivity
from ..models.quantizer import ModelQuantizer
from ..models.report import sites_with_macs
from ..plan import Site
from .calib_data import CalibrationImages, CalibSettings


def detector_loss(seed: int):
    """``loss(model, batch)``: the detector's summed training loss on one batch, its random RoI
    sampling seeded per batch (so the measurement is reproducible)."""
    calls = [0]

    def loss(model: nn.Module, batch: Any) -> Tensor:
        torch.manual_seed(seed + calls[0])
        calls[0] += 1
        data = model.data_preprocessor(batch, True)
        total, _ = model.parse_losses(model(**data, mode='loss'))
        return total

    return loss


def detector_sensitivity(
    model: nn.Module,
    cfg: Any,
    config: QuantConfig,
    calib: CalibSettings,
    levels: list[int],
    *,
    seed: int = 0,
    logger: logging.Logger | None = None,
    progress: bool = True,
    assignment: dict[str, tuple[int, int]] | None = None,
) -> tuple[dict[str, dict[int, float]], list[Site], list]:
    """``(sensitivity table, sites in scope, calibration image ids)`` of a float detector.

    ``config`` says what would be quantized (scope, method: which inputs are per channel, the pinned
    patch-embedding bits); its bit-widths are not used. ``assignment`` (site -> ``(w_bits, a_bits)``,
    e.g. a plan resolved on the sites) measures with those sites quantized instead of float
    (LampQ's iterative update; :func:`mmdet_lrpq.models.fisher.fisher_sensitivity`).
    """
    logger = logger or logging.getLogger('mmdet_lrpq')
    model.eval()
    quantizer = ModelQuantizer(model, config, logger=logger)
    sites = quantizer.sites()
    fixed = config.pinned_act_bits(sites)
    if calib.batch_size != 1:
        raise ValueError('the sensitivity is a per-image Fisher expectation: use calib batch_size=1')
    images = CalibrationImages(cfg.test_dataloader.dataset, calib, logger)
    logger.info(f'sensitivity: {len(images)} calibration image(s), ids {images.ids}, bits {levels}')
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(images), desc='sensitivity', unit='img', leave=False)
    try:
        table = fisher_sensitivity(
            model,
            sites,
            levels,
            images.batches(),
            detector_loss(seed),
            per_channel_inputs=frozenset(p.layer for p in quantizer.pairs),
            fixed_a_bits=fixed,
            progress=None if bar is None else (lambda n: bar.update(n - bar.n)),
            assignment=assignment,
        )
    finally:
        if bar is not None:
            bar.close()
    return table, sites, images.ids


def measure_macs(
    model: nn.Module, cfg: Any, config: QuantConfig, calib: CalibSettings, logger: logging.Logger | None = None
) -> list[Site]:
    """The sites in scope with their MACs per image, counted on the calibration images in test mode.

    Counted as the quantization report counts them (:func:`mmdet_lrpq.quant.macs.count_macs` on the
    wrapped modules, FLOAT state, ``test_step``), on a copy of ``model``, so the BOPs a plan is
    budgeted with are the BOPs the report of the quantized detector will print.
    """
    from ..quant.macs import count_macs

    logger = logger or logging.getLogger('mmdet_lrpq')
    work = copy.deepcopy(model).eval()
    quantizer = ModelQuantizer(work, config, logger=logger)
    sites = quantizer.wrap().sites
    images = CalibrationImages(cfg.test_dataloader.dataset, calib, logger)
    n = 0
    with torch.no_grad(), count_macs(work) as macs:
        for batch in images.batches():
            work.test_step(batch)
            n += len(batch['inputs'])
    if not n:
        raise ValueError('measure_macs: no calibration images')
    return sites_with_macs(sites, macs, n)


__all__ = ['detector_loss', 'detector_sensitivity', 'measure_macs']
