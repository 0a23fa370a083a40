"""``QuantizationHook``: post-training quantization of any mmdet detector, from config alone.

Add to any mmdet 3.x config::

    custom_imports = dict(imports=['mmdet_lrpq'], allow_failed_imports=False)
    custom_hooks = [dict(type='mmdet_lrpq.QuantizationHook', w_bits=4, a_bits=4, method='crl')]
    # or a mixed-precision plan: dict(type='mmdet_lrpq.QuantizationHook', plan='configs/plans/swin_t_mp4.json')

In ``before_test`` (and ``before_val`` outside training) it quantizes the detector under test
(inside DDP or test-time-augmentation wrappers) with :func:`.quantize.quantize_detector` — the
same code as :func:`mmdet_lrpq.apis.init_quantized_detector` — logs the per-layer table and
totals and writes them to ``<work_dir>/<report_file>``; then the normal test loop evaluates the
quantized model on whatever device the runner put it.
"""

from __future__ import annotations

import json
import os
import os.path as osp

from mmengine.dist import get_dist_info
from mmengine.hooks import Hook
from mmengine.runner import BaseLoop

from ..config import QuantConfig
from ..models.report import QuantReport
from ..models.state import STATE_MISMATCH
from ..registry import HOOKS
from .calib_data import CalibSettings
from .quantize import detector_of, quantize_detector


@HOOKS.register_module()
class QuantizationHook(Hook):
    """Quantize the model under test (see module docstring).

    The quantization options are :class:`mmdet_lrpq.QuantConfig`'s (see its docstring);
    ``reconstruct=dict(...)`` (:class:`mmdet_lrpq.ReconstructConfig` fields) learns rounding and step
    sizes after calibration, on the same calibration images.
    ``calib``: :class:`~mmdet_lrpq.engine.CalibSettings` fields (``source``, ``num_images``,
    ``seed``, ``image_ids``, ``batch_size``, ``ann_file``, ``img_prefix``, ``data_root``).
    ``state_file``: save the calibrated state there; a later run loads it instead of calibrating
    when it was made from the same weights, options and calibration settings, and otherwise stops
    with the difference (``state_mismatch='recalibrate'``: recalibrates and replaces it).
    ``report_file``: the per-site report, in the work dir.
    """

    priority = 'VERY_HIGH'  # before any other before_test work looks at the model

    def __init__(
        self,
        calib: dict | None = None,
        state_file: str | None = None,
        state_mismatch: str = 'error',
        report_file: str = 'quantization_report.json',
        **options,
    ):
        # One option surface: every other keyword is a QuantConfig field, forwarded as written. "Given" means
        # given: an option written in the config counts even when it equals the default.
        self.given = dict(options)
        self.explicit = sorted(self.given)
        self.config = QuantConfig.from_options(self.given, 'QuantizationHook')  # validates at config build time
        if isinstance(self.config.plan, str):
            self.config.load_plan()  # a malformed plan file is refused now, not after loading data
        self.calib = CalibSettings.from_options(calib)
        if state_mismatch not in STATE_MISMATCH:
            raise ValueError(f'state_mismatch must be one of {STATE_MISMATCH}, got {state_mismatch!r}')
        self.state_file = state_file
        self.state_mismatch = state_mismatch
        self.report_file = report_file
        self.report: QuantReport | None = None

    def before_test(self, runner) -> None:
        self._quantize(runner)

    def before_val(self, runner) -> None:
        if isinstance(getattr(runner, '_train_loop', None), BaseLoop):
            runner.logger.warning('QuantizationHook does nothing during training validation')
            return
        self._quantize(runner)

    # ------------------------------------------------------------------
    def config_for(self, model) -> QuantConfig:
        """The hook's options, or those of a ``QuantSwinTransformer`` backbone (never both).

        Precedence is never silent: a backbone that declares its options owns them, and any option
        written in the hook as well (even one equal to its default) is an error naming both values.
        """
        declared = getattr(getattr(model, 'backbone', None), 'quant_config', None)
        if declared is None:
            return self.config
        if self.explicit:
            values = ', '.join(f'{k}: hook {self.given[k]!r}, backbone {getattr(declared, k)!r}' for k in self.explicit)
            raise ValueError(
                'quantization options are given both in the QuantSwinTransformer backbone '
                f"(model.backbone.quant) and in QuantizationHook ({values}); the backbone's would "
                f'be used. Keep them in one place: remove {self.explicit} from the hook, or make '
                f'the backbone a plain SwinTransformer'
            )
        return declared

    def check_plan(self, model) -> None:
        """Check the plan against ``model``'s sites now (cheap: nothing is wrapped or calibrated), so a plan
        that does not fit stops a run before its dataset and checkpoint are loaded."""
        import logging

        from ..models.quantizer import ModelQuantizer

        quiet = logging.getLogger('mmdet_lrpq.precheck')
        quiet.propagate, quiet.disabled = False, True  # the real run logs the adapters' warnings
        quantizer = ModelQuantizer(model, self.config_for(model), logger=quiet)
        quantizer.resolve_bits(quantizer.sites())

    def quantize_model(self, model, cfg, logger, progress: bool = True) -> QuantReport:
        """Quantize a built detector with this hook's settings (also what init_quantized_detector runs)."""
        return quantize_detector(
            model,
            cfg,
            self.config_for(model),
            self.calib,
            state_file=self.state_file,
            state_mismatch=self.state_mismatch,
            logger=logger,
            progress=progress,
        )

    def _quantize(self, runner) -> None:
        if self.report is not None:
            return
        self.report = self.quantize_model(detector_of(runner.model), runner.cfg, runner.logger)
        runner.logger.info('quantization:\n' + self.report.table())
        runner.message_hub.update_info('quantization_report', self.report.to_dict())
        if get_dist_info()[0] == 0:
            os.makedirs(runner.work_dir, exist_ok=True)
            path = osp.join(runner.work_dir, self.report_file)
            with open(path, 'w') as f:
                json.dump(self.report.to_dict(), f, indent=1)
            runner.logger.info(f'quantization report written to {path}')
