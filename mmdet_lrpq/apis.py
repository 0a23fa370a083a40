"""MMDetection-style Python entry points: a quantized detector from a config and a checkpoint.

    from mmdet.apis import inference_detector
    from mmdet_lrpq.apis import init_quantized_detector

    model = init_quantized_detector('configs/mask_rcnn_swin_t_mp4.py', 'mask_rcnn_swin_t.pth', device='cuda:0')
    result = inference_detector(model, 'demo.jpg')        # runs the quantized model
    print(model.quantization_report)                      # the hook's table and totals

The config's ``QuantizationHook`` options (or its ``QuantSwinTransformer`` backbone) say how to
quantize and which images calibrate; the same code as the hook does it. ``mmdet.apis.init_detector``
on such a config returns the float model (hooks only run in the Runner) and warns so.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import torch


def _hook_options(cfg: Any) -> dict | None:
    from .registry import has_quantization_hook, is_quantization_hook

    if not has_quantization_hook(cfg):
        return None
    hook = next(h for h in cfg.custom_hooks if is_quantization_hook(h.get('type')))
    return {k: v for k, v in hook.items() if k != 'type'}


def init_quantized_detector(
    config: str | Any,
    checkpoint: str,
    device: str | None = None,
    cfg_options: dict | None = None,
    logger: logging.Logger | None = None,
    progress: bool = True,
) -> torch.nn.Module:
    """Build the detector of ``config``, load ``checkpoint``, quantize it as the config says; return it.

    ``device``: where the model runs and calibrates (default ``cuda:0`` when available, else ``cpu``).
    ``progress``: progress bars for calibration (and reconstruction, where configured).
    The report is attached as ``model.quantization_report``. A checkpoint whose tensors do not fit
    the model, or that cannot be read, is refused (mmengine would only warn and evaluate random
    layers). Class names come from the checkpoint's meta (else the dataset's, as init_detector).
    """
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.runner import load_checkpoint

    from . import register_all_modules
    from .engine import check_checkpoint_fits, require_checkpoint
    from .engine.hook import QuantizationHook

    register_all_modules()
    from mmdet.apis import inference

    init_detector = getattr(inference.init_detector, '__wrapped_by_mmdet_lrpq__', inference.init_detector)
    cfg = Config.fromfile(config) if isinstance(config, str) else copy.deepcopy(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    options = _hook_options(cfg)
    from .registry import is_quant_backbone

    declared = is_quant_backbone(cfg.model.get('backbone', {}).get('type'))
    if options is None and not declared:
        raise ValueError(
            f'{config if isinstance(config, str) else "the config"} adds no QuantizationHook to '
            f'custom_hooks (and its backbone is not QuantSwinTransformer): nothing says how to quantize. '
            f'Use one of configs/*_{{w4a4,w6a6,mp4,mp6}}.py, or mmdet.apis.init_detector for the float model.'
        )
    require_checkpoint(checkpoint)
    device = device or ('cuda:0' if torch.cuda.is_available() else 'cpu')
    # init_detector without a checkpoint warns that it uses COCO's classes (it resets the warning
    # filters itself, so record instead of ignoring); the checkpoint's classes come next
    with warnings.catch_warnings(record=True) as caught:
        model = init_detector(cfg, None, device='cpu')
    for w in caught:
        if 'checkpoint is None' not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    hook = QuantizationHook(**(options or {}))
    hook.check_plan(model)  # a plan that does not fit: refused before the checkpoint loads
    check_checkpoint_fits(model, checkpoint)  # refused before anything is evaluated
    meta = load_checkpoint(model, checkpoint, map_location='cpu', logger='silent').get('meta', {})
    if 'dataset_meta' in meta:
        model.dataset_meta = {k.lower(): v for k, v in meta['dataset_meta'].items()}
    elif 'CLASSES' in meta:
        model.dataset_meta = {'classes': meta['CLASSES']}
    model.to(device)
    logger = logger or MMLogger.get_current_instance()
    model.quantization_report = hook.quantize_model(model, model.cfg, logger, progress=progress)
    return model


__all__ = ['init_quantized_detector']
