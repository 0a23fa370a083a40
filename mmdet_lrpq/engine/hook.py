"""``QuantizationHook``: post-training quantization of any mmdet detector, from config alone.

Add to any mmdet 3.x config::

    custom_imports = dict(imports=['mmdet_lrpq'], allow_failed_imports=False)
    custom_hooks = [dict(type='QuantizationHook', w_bits=4, a_bits=4, method='crl')]
    # or a mixed-precision plan: dict(type='QuantizationHook', plan='configs/plans/swin_t_mp4.json')

In ``before_test`` (and ``before_val`` outside training) it wraps the detector, calibrates on
the calibration images (one batch), reparameterizes, logs the per-layer table and totals and
writes them to ``<work_dir>/<report_file>``; then the normal test loop evaluates the quantized
model. With ``state_file`` the calibrated state is saved, and a later run loads it instead of
calibrating. Under distributed testing rank 0 calibrates and every rank receives the same
calibrated state, so every rank evaluates the quantized model.
"""
from __future__ import annotations

import json
import os
import os.path as osp
from typing import Optional

import torch
from mmengine.dist import broadcast_object_list, get_dist_info
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.runner import BaseLoop

from mmdet.registry import HOOKS

from ..models.detector import DetectorQuantizer, QuantSettings
from .calib_data import CalibSettings, batch_input_hw, build_calibration_batch


@HOOKS.register_module()
class QuantizationHook(Hook):
    """Quantize the model under test (see module docstring). Options: ``QuantSettings`` fields
    (``w_bits``, ``a_bits``, ``plan``, ``method``, ``crl_k``, ``scope``, ``round_zero_point``,
    ``patch_embed_a_bits``, ``reparam_output_norms``), ``calib`` (``CalibSettings`` fields:
    ``source``, ``num_images``, ``seed``, ``ann_file``, ``img_prefix``, ``data_root``),
    ``state_file`` and ``report_file``."""

    priority = 'VERY_HIGH'   # before any other before_test work looks at the model

    def __init__(self, calib: Optional[dict] = None, state_file: Optional[str] = None,
                 report_file: str = 'quantization_report.json', **settings):
        self.explicit_settings = settings
        self.settings = QuantSettings(**settings)          # validates early, at config build time
        self.calib = CalibSettings(**(calib or {}))
        self.state_file = state_file
        self.report_file = report_file
        self.quantizer: Optional[DetectorQuantizer] = None

    def before_test(self, runner) -> None:
        self._quantize(runner)

    def before_val(self, runner) -> None:
        if isinstance(getattr(runner, '_train_loop', None), BaseLoop):
            runner.logger.warning('QuantizationHook does nothing during training validation')
            return
        self._quantize(runner)

    # ------------------------------------------------------------------
    def _settings_for(self, model) -> QuantSettings:
        declared = getattr(getattr(model, 'backbone', None), 'quant_settings', None)
        if declared is None:
            return self.settings
        if self.explicit_settings:
            raise ValueError('quantization settings are given both in the QuantSwinTransformer backbone '
                             f'and in QuantizationHook ({sorted(self.explicit_settings)}); keep one of them')
        return declared

    def _quantize(self, runner) -> None:
        if self.quantizer is not None:
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        quantizer = DetectorQuantizer(model, self._settings_for(model), logger=runner.logger)
        if hasattr(model.backbone, 'claim_quantization'):
            model.backbone.claim_quantization()
        rank, world_size = get_dist_info()
        if self.state_file and osp.isfile(self.state_file):
            runner.logger.info(f'loading calibrated state from {self.state_file} (no calibration)')
            quantizer.load_state(torch.load(self.state_file, map_location='cpu', weights_only=True))
        elif world_size > 1:
            state = [None]
            if rank == 0:
                self._calibrate(runner, quantizer)
                state = [quantizer.state()]
            broadcast_object_list(state, src=0)
            if rank != 0:
                quantizer.load_state(state[0])
        else:
            self._calibrate(runner, quantizer)
        self.quantizer = quantizer
        runner.logger.info('quantization:\n' + quantizer.table())
        runner.message_hub.update_info('quantization_report', quantizer.report())
        if rank == 0:
            os.makedirs(runner.work_dir, exist_ok=True)
            path = osp.join(runner.work_dir, self.report_file)
            with open(path, 'w') as f:
                json.dump(quantizer.report(), f, indent=1)
            runner.logger.info(f'quantization report written to {path}')

    def _calibrate(self, runner, quantizer: DetectorQuantizer) -> None:
        batch, ids = build_calibration_batch(runner.cfg.test_dataloader.dataset, self.calib)
        where = self.calib.source + (f' ({self.calib.ann_file})' if self.calib.ann_file else '')
        how = 'as given by calib.image_ids' if self.calib.image_ids is not None else f'seed {self.calib.seed}'
        runner.logger.info(f'calibrating on {len(ids)} image(s) of {where}, ids {ids} ({how})')
        model = quantizer.model
        model.eval()
        quantizer.calibrate(lambda m: m.test_step(batch), image_ids=ids, n_images=len(ids),
                            input_shape=batch_input_hw(model, batch))
        if self.state_file:
            os.makedirs(osp.dirname(osp.abspath(self.state_file)), exist_ok=True)
            torch.save(quantizer.state(), self.state_file)
            runner.logger.info(f'calibrated state saved to {self.state_file}')
