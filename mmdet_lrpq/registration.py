"""Registration with MMEngine/MMDetection, independent of import order.

A config's ``custom_imports=['mmdet_lrpq']`` imports the package while MMEngine is loaded; then
everything registers at once (the hook, the quantized backbone type, the checkpoint allow-list).
When ``mmdet_lrpq`` is imported *before* MMEngine (a script that starts with ``import
mmdet_lrpq``), a config's ``custom_imports`` later finds the package already imported and runs
nothing, which used to leave the hook unregistered. So at that point a post-import hook waits for
``mmengine.registry`` and registers lazy builders for ``QuantizationHook`` and
``QuantSwinTransformer`` in MMEngine's root registries (MMDetection's registries fall back to
them) plus the checkpoint allow-list; the first build registers the rest. Pure users of
``mmdet_lrpq.quant``/``lrp``/``plan`` never import MMEngine or MMDetection.

``mmdet.apis.init_detector`` builds models without running hooks, so on a config with
``QuantizationHook`` it returns a float model; it is wrapped to warn and name
:func:`mmdet_lrpq.apis.init_quantized_detector`.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any, Callable

_done: set[str] = set()

INIT_DETECTOR_WARNING = ('init_detector() returns a FLOAT model for a config with QuantizationHook (hooks only '
                         'run in the Runner); use mmdet_lrpq.apis.init_quantized_detector(config, checkpoint, '
                         'device=...) for the quantized model')


def register_all_modules() -> None:
    """Register the hook, the quantized backbone and the checkpoint allow-list with MMEngine/MMDetection."""
    if 'all' in _done:
        return
    from .env import check_openmmlab_stack
    check_openmmlab_stack()
    from . import engine  # noqa: F401  (registers QuantizationHook in mmdet's HOOKS)
    from .models import quant_swin  # noqa: F401  (registers QuantSwinTransformer in mmdet's MODELS)
    _register_mmengine_basics()
    _done.add('all')


def _register_mmengine_basics() -> None:
    """What only needs mmengine itself: lazy root-registry builders and the checkpoint allow-list."""
    if 'basics' in _done:
        return
    from mmengine.registry import HOOKS, MODELS

    from .safe_load import allow_mmengine_checkpoints
    for registry, name, build in ((HOOKS, 'QuantizationHook', _build_hook),
                                  (MODELS, 'QuantSwinTransformer', _build_backbone)):
        if name not in registry.module_dict:
            registry.register_module(name=name, module=build)
    allow_mmengine_checkpoints()
    _done.add('basics')


def _build_hook(**kwargs: Any):
    register_all_modules()
    from .engine.hook import QuantizationHook
    return QuantizationHook(**kwargs)


def _build_backbone(**kwargs: Any):
    register_all_modules()
    from .models.quant_swin import QuantSwinTransformer
    return QuantSwinTransformer(**kwargs)


# ---------------------------------------------------------------- post-import hooks
class _CallbackLoader(importlib.abc.Loader):
    """Runs a module's own loader, then the callback; everything else is the original loader's."""

    def __init__(self, loader: Any, callback: Callable[[], None]):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader
        self._callback()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callback, self._finding = name, callback, False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        if spec is None or spec.loader is None:
            return None
        sys.meta_path.remove(self)
        spec.loader = _CallbackLoader(spec.loader, self.callback)
        return spec


def after_import(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback`` now if module ``name`` is loaded, else right after it is first imported."""
    if name in sys.modules:
        callback()
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, callback))


def install() -> None:
    """What ``import mmdet_lrpq`` does (see module docstring)."""
    after_import('mmdet.apis', _wrap_init_detector)
    if 'mmengine.registry' in sys.modules:
        register_all_modules()
        _warn_if_inside_init_detector()
    else:
        after_import('mmengine.registry', _register_mmengine_basics)


# ---------------------------------------------------------------- init_detector returns a float model
def has_quantization_hook(cfg: Any) -> bool:
    """Does a config (or its raw dict) add ``QuantizationHook`` to ``custom_hooks``?"""
    hooks = (cfg.get('custom_hooks') or []) if hasattr(cfg, 'get') else []
    types = [h.get('type') if hasattr(h, 'get') else None for h in hooks]
    return any(t == 'QuantizationHook' or getattr(t, '__name__', None) == 'QuantizationHook' for t in types)


def _wrap_init_detector() -> None:
    if 'init_detector' in _done:
        return
    # (right after mmdet.apis executed, it is not yet an attribute of the mmdet package)
    apis, inference = sys.modules['mmdet.apis'], sys.modules['mmdet.apis.inference']
    original = inference.init_detector

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
    _done.add('init_detector')


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
