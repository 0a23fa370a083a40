"""Registration with MMEngine/MMDetection: the scope ``mmdet_lrpq`` and its registries.

The MMEngine way: child registries of MMEngine's root registries with an explicit scope and
``locations``. A config names ``type='mmdet_lrpq.QuantizationHook'`` (or
``'mmdet_lrpq.QuantSwinTransformer'``); MMEngine imports this module by itself when it meets the
scope, and each registry imports its classes' module when first asked. That works in any import
order, with or without ``custom_imports``; importing this module costs MMEngine's registry only.

Plain names (``type='QuantizationHook'``, as configs written for earlier versions say) resolve once
:func:`register_all_modules` has run: it aliases the classes in MMDetection's registries (the scope
configs default to). A config's ``custom_imports=dict(imports=['mmdet_lrpq'])`` runs it when MMEngine
is already loaded, which is always the case for a config file; a script that imported the package
before MMEngine calls it itself (or uses the scoped names).

``import mmdet_lrpq`` registers (when MMEngine is loaded) and does nothing else to the process.
Registration does two process-wide things besides, each for a reason and only where MMEngine is in
use:

* the weights-only allow-list for MMEngine's checkpoints (:func:`.safe_load.allow_mmengine_checkpoints`):
  torch >= 2.6 loads them with ``weights_only=True`` and refuses the ``HistoryBuffer`` objects MMEngine
  pickles into them;
* a wrapper around ``mmdet.apis.init_detector`` that warns when it builds a float model from a config
  with ``QuantizationHook`` (hooks only run in the Runner): nothing of ours runs inside that call
  otherwise. The first call of a process imports us from its config, mid-call: that one is found on
  the call stack.

The ``mmcv._ext`` stand-in (compiled ops from torchvision) is the one import hook of the project and
lives in ``_mmdet_lrpq_mmcv``, installed at interpreter start by a ``.pth`` file (``make install``);
registration installs it too where that file is missing.
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Any

from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

SCOPE = 'mmdet_lrpq'

HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope=SCOPE, locations=['mmdet_lrpq.engine.hook'])
MODELS = Registry('model', parent=MMENGINE_MODELS, scope=SCOPE, locations=['mmdet_lrpq.models.quant_swin'])
MODEL_WRAPPERS = Registry(
    'model_wrapper', parent=MMENGINE_MODEL_WRAPPERS, scope=SCOPE, locations=['mmdet_lrpq.engine.ddp']
)

INIT_DETECTOR_WARNING = (
    'init_detector() returns a FLOAT model for a config with QuantizationHook (hooks only '
    'run in the Runner); use mmdet_lrpq.apis.init_quantized_detector(config, checkpoint, '
    'device=...) for the quantized model'
)

_registered = False


def register_all_modules() -> None:
    """Register everything (idempotent): the classes, their plain-name aliases in MMDetection's registries,
    the checkpoint allow-list and the ``init_detector`` warning (see the module docstring)."""
    global _registered
    if _registered:
        return
    import _mmdet_lrpq_mmcv

    _mmdet_lrpq_mmcv.install()  # no-op where the .pth installed it at interpreter start
    from .env import check_openmmlab_stack

    check_openmmlab_stack()
    from mmdet.registry import HOOKS as MMDET_HOOKS
    from mmdet.registry import MODELS as MMDET_MODELS

    from .safe_load import allow_mmengine_checkpoints

    for ours, theirs in ((HOOKS, MMDET_HOOKS), (MODELS, MMDET_MODELS)):
        ours.import_from_location()
        for name, cls in ours.module_dict.items():
            if theirs.module_dict.get(name) is not cls:
                theirs.register_module(name=name, module=cls, force=True)
    MODEL_WRAPPERS.import_from_location()
    allow_mmengine_checkpoints()
    _wrap_init_detector()
    _registered = True
    _warn_if_inside_init_detector()


def names_ours(type_: Any, name: str) -> bool:
    """Does a config ``type`` (the plain or the ``mmdet_lrpq.``-scoped name, or the class) name our class ``name``?"""
    if isinstance(type_, str):
        return type_ in (name, f'{SCOPE}.{name}')
    return getattr(type_, '__name__', None) == name


def is_quantization_hook(hook_type: Any) -> bool:
    """Does a ``custom_hooks`` entry's ``type`` name our hook?"""
    return names_ours(hook_type, 'QuantizationHook')


def is_quant_backbone(backbone_type: Any) -> bool:
    """Does a backbone ``type`` name :class:`~.models.quant_swin.QuantSwinTransformer`?"""
    return names_ours(backbone_type, 'QuantSwinTransformer')


def has_quantization_hook(cfg: Any) -> bool:
    """Does a config (or its raw dict) add ``QuantizationHook`` to ``custom_hooks``?"""
    hooks = (cfg.get('custom_hooks') or []) if hasattr(cfg, 'get') else []
    return any(is_quantization_hook(h.get('type')) for h in hooks if hasattr(h, 'get'))


def _wrap_init_detector() -> None:
    from mmdet.apis import inference

    apis = sys.modules['mmdet.apis']
    original = inference.init_detector
    if hasattr(original, '__wrapped_by_mmdet_lrpq__'):
        return

    @functools.wraps(original)
    def init_detector(config, *args, **kwargs):
        from mmengine.config import Config

        model = original(config, *args, **kwargs)
        cfg = getattr(model, 'cfg', None) or (Config.fromfile(config) if isinstance(config, str) else config)
        if has_quantization_hook(cfg):
            warnings.warn(INIT_DETECTOR_WARNING, stacklevel=2)
        return model

    init_detector.__wrapped_by_mmdet_lrpq__ = original
    inference.init_detector = apis.init_detector = init_detector


def _warn_if_inside_init_detector() -> None:
    """The first ``init_detector`` of a process imports us from its config: warn from that call."""
    frame = sys._getframe(1)
    cfg_dict, in_init = None, False
    while frame is not None:
        code = frame.f_code
        module = frame.f_globals.get('__name__', '')
        if module == 'mmengine.config.config' and code.co_name == 'fromfile' and cfg_dict is None:
            cfg_dict = frame.f_locals.get('cfg_dict')
        if module == 'mmdet.apis.inference' and code.co_name == 'init_detector':
            in_init = True
            break
        frame = frame.f_back
    if in_init and cfg_dict is not None and has_quantization_hook(cfg_dict):
        warnings.warn(INIT_DETECTOR_WARNING, stacklevel=2)


__all__ = [
    'SCOPE',
    'HOOKS',
    'MODELS',
    'MODEL_WRAPPERS',
    'register_all_modules',
    'has_quantization_hook',
    'is_quantization_hook',
    'is_quant_backbone',
    'INIT_DETECTOR_WARNING',
]
