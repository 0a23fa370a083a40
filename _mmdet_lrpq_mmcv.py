"""mmdet-lrpq's one import hook: ``import mmcv._ext`` finds mmcv's compiled ops, or a stand-in.

MMDetection imports ``mmcv.ops``, whose modules load the compiled extension ``mmcv._ext`` at
import time. mmcv-lite has none, and an mmcv built for another torch has one that does not load;
either way every detector fails before our code runs. This finder, placed first on
``sys.meta_path``, answers only for the module ``mmcv._ext``: it loads the compiled extension when
there is one and it loads, and otherwise builds the stand-in of :mod:`mmdet_lrpq.ops` (torchvision
and PyTorch kernels). No other import is touched.

Why a top-level module and a ``.pth`` file: the hook must be in place before *any* import of
``mmcv.ops`` — also when a script imports mmdet before mmdet_lrpq (MMDetection's own
``tools/test.py`` does) — and a ``.pth`` line is the standard way to run something at interpreter
start. It imports nothing but the standard library until ``mmcv._ext`` is actually imported.
``make install`` writes the ``.pth`` file (``python -m _mmdet_lrpq_mmcv --install``);
``import mmdet_lrpq`` installs the finder too, for environments without it.

``MMDET_LRPQ_MMCV_OPS`` chooses: ``auto`` (default: compiled when it loads), ``compiled`` (never
the stand-in: mmcv's own import errors), ``torchvision`` (always the stand-in, e.g. to compare
the two in one environment).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

TARGET = 'mmcv._ext'
ENV = 'MMDET_LRPQ_MMCV_OPS'
MODES = ('auto', 'compiled', 'torchvision')
PTH_NAME = 'mmdet_lrpq_mmcv_ops.pth'
PTH_LINE = (
    "import importlib.util as _u; _u.find_spec('_mmdet_lrpq_mmcv') is not None and "
    "__import__('_mmdet_lrpq_mmcv').install()\n"
)

_state: dict = {'backend': None, 'reason': 'mmcv._ext has not been imported yet'}


def mode() -> str:
    value = os.environ.get(ENV, 'auto').strip().lower() or 'auto'
    if value not in MODES:
        raise ImportError(
            f'{ENV}={value!r} is not one of {", ".join(MODES)} (auto: compiled mmcv ops when they '
            f'load, else the torchvision backend)'
        )
    return value


class _Loader(importlib.abc.Loader):
    def __init__(self, compiled: importlib.machinery.ModuleSpec | None, why: str):
        self.compiled, self.why = compiled, why

    def create_module(self, spec):
        if self.compiled is not None:
            try:
                module = importlib.util.module_from_spec(self.compiled)
                self.compiled.loader.exec_module(module)
            except (ImportError, OSError) as err:
                self.why = (
                    f'the compiled mmcv._ext at {self.compiled.origin} does not load '
                    f'({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ""})'
                )
            else:
                _state.update(backend='compiled', reason=f'compiled mmcv._ext from {self.compiled.origin}')
                return module
        module = _stand_in_package().build_module(spec)
        _state.update(backend='torchvision', reason=self.why)
        return module

    def exec_module(self, module) -> None:
        """Both kinds of module are complete when created."""


def _stand_in_package():
    """``mmdet_lrpq.ops``, without running ``mmdet_lrpq/__init__`` when it is not imported yet.

    This runs in the middle of ``import mmcv.ops``; importing the ``mmdet_lrpq`` package then would
    register with MMDetection, which imports ``mmcv.ops`` again — a circular import. The subpackage
    needs nothing from its parent, so it is loaded on its own; ``mmdet_lrpq`` finds it in
    ``sys.modules`` when it is imported later.
    """
    name = 'mmdet_lrpq.ops'
    if name in sys.modules:
        return sys.modules[name]
    if 'mmdet_lrpq' in sys.modules:
        return importlib.import_module(name)
    parent = importlib.util.find_spec('mmdet_lrpq')
    if parent is None or not parent.submodule_search_locations:
        raise ImportError('mmcv has no compiled ops and the mmdet_lrpq package that provides them is not importable')
    folder = os.path.join(list(parent.submodule_search_locations)[0], 'ops')
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(folder, '__init__.py'), submodule_search_locations=[folder]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


class _Finder(importlib.abc.MetaPathFinder):
    """Answers for ``mmcv._ext`` only (see the module docstring)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        chosen = mode()
        if chosen == 'compiled':
            return None
        compiled = importlib.machinery.PathFinder.find_spec(fullname, path) if chosen == 'auto' else None
        why = (
            f'{ENV}=torchvision'
            if chosen == 'torchvision'
            else 'mmcv has no compiled ops (mmcv-lite)'
            if compiled is None
            else ''
        )
        return importlib.machinery.ModuleSpec(fullname, _Loader(compiled, why), origin='mmdet-lrpq')


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once; nothing if ``mmcv._ext`` is already loaded)."""
    if TARGET in sys.modules or any(
        type(f).__name__ == '_Finder' and type(f).__module__ == __name__ for f in sys.meta_path
    ):
        return
    sys.meta_path.insert(0, _Finder())


def backend() -> dict:
    """``{'backend': 'compiled' | 'torchvision' | None, 'reason': ...}`` for the loaded ``mmcv._ext``."""
    module = sys.modules.get(TARGET)
    if module is None:
        return dict(_state)
    if getattr(module, '__mmdet_lrpq_backend__', None) == 'torchvision':
        return {
            'backend': 'torchvision',
            'reason': _state['reason'] if _state['backend'] == 'torchvision' else 'stand-in installed',
        }
    return {
        'backend': 'compiled',
        'reason': _state['reason']
        if _state['backend'] == 'compiled'
        else f'compiled mmcv._ext from {getattr(module, "__file__", "?")}',
    }


def write_pth(site_dir: str) -> str:
    """Write the ``.pth`` file that installs the finder at interpreter start; returns its path."""
    path = os.path.join(site_dir, PTH_NAME)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        f.write(PTH_LINE)
    os.replace(tmp, path)
    return path


if __name__ == '__main__':
    import argparse
    import sysconfig

    parser = argparse.ArgumentParser(
        prog='python -m _mmdet_lrpq_mmcv', description='Install the mmcv._ext import hook into an environment.'
    )
    parser.add_argument(
        '--install',
        nargs='?',
        const=sysconfig.get_paths()['purelib'],
        metavar='SITE_DIR',
        help="write the .pth file (default: this interpreter's site-packages)",
    )
    args = parser.parse_args()
    if args.install:
        print(write_pth(args.install))
    else:
        parser.print_help()
