"""The software stack mmdet-lrpq runs on: what is installed, and whether it fits.

:func:`stack_report` says which versions of Python, torch, torchvision, timm, MMEngine, MMCV (and
whether its compiled ops are there, with or without CUDA) and MMDetection are installed.
:func:`check_openmmlab_stack` raises :class:`OpenMMLabStackError` with every problem it finds
— the package, the version found, the supported range and the fix — instead of letting an
incompatible stack fail later with an obscure error deep inside MMDetection.

This module imports nothing heavy at import time: torch, mmcv, mmengine and mmdet are only
imported inside the functions, and versions are read from the installed distributions' metadata
first, so the check itself never trips over mmdet's own import-time assertions.

``python -m mmdet_lrpq.env`` prints the report and the check's verdict.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import sys
import warnings

# Supported ranges, [minimum, maximum) — what the code needs (setup.py states the same bounds).
PYTHON_MIN = (3, 10)  # zip(strict=...) in lrp/scores.py
TORCH_MIN = '2.6'  # weights_only loading with (obj, 'module.name') allow-list entries
TIMM_MIN = '1.0.8'  # SwinTransformer(always_partition=, strict_img_size=), dynamic_mask
MMENGINE_RANGE = ('0.10.0', '1.0.0')
MMCV_RANGE = ('2.0.0rc4', '2.2.0')  # what mmdet 3.x accepts (it asserts this when imported)
MMDET_RANGE = ('3.1.0', '3.4.0')

BUILD_MMCV = (
    '`mim install "mmcv>=2.0.0rc4,<2.2.0"` where OpenMMLab publishes a wheel for your torch and CUDA, '
    'otherwise build it from the sdist: `MMCV_WITH_OPS=1 pip install --no-build-isolation --no-binary mmcv '
    'mmcv==2.1.0` (FORCE_CUDA=1 for CUDA ops; with torch >= 2.10 first raise the -std=c++17 flags of '
    "mmcv's setup.py to c++20, as `make install` does: docs/install.md)"
)


class OpenMMLabStackError(ImportError, RuntimeError):
    """The installed torch / MMEngine / MMCV / MMDetection stack cannot run mmdet-lrpq."""


# ------------------------------------------------------------------------------------ versions
def parse_version(text: str) -> tuple:
    """'2.0.0rc4' -> (2, 0, 0, 0, 4); '2.14.1+cu130' -> (2, 14, 1, 1, 0): comparable tuples.

    Enough for the release/pre-release numbers of the packages checked here; the 4th element
    orders pre-releases (a, b, rc, dev: 0) before the final release (1).
    """
    m = re.match(r'\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:\.\d+)*(?:[.-]?(a|b|rc|dev|alpha|beta|pre)\.?(\d*))?', text)
    if not m:
        return (0, 0, 0, 0, 0)
    major, minor, micro, pre, pre_n = m.groups()
    return (int(major), int(minor or 0), int(micro or 0), 0 if pre else 1, int(pre_n or 0))


def _in_range(version: str, lo: str | None, hi: str | None = None) -> bool:
    if version == 'unknown':  # a source tree without a readable version: nothing to hold against it
        return True
    v = parse_version(version)
    return (lo is None or v >= parse_version(lo)) and (hi is None or v < parse_version(hi))


def _installed_version(dist: str) -> str | None:
    """The version of installed distribution ``dist`` (metadata only: nothing is imported)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _module_version(module: str) -> str | None:
    """``module/version.py``'s ``__version__`` for a module without distribution metadata
    (a source tree on PYTHONPATH), read without running the package's ``__init__``."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, 'version.py')
        if os.path.isfile(path):
            with open(path) as f:
                m = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", f.read(), re.M)
            if m:
                return m.group(1)
    return 'unknown'


def _version_of(module: str, dists: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(version, distribution name) of the first installed distribution in ``dists`` providing
    ``module``, else of the module found on sys.path ('unknown' if it has no version.py)."""
    for dist in dists:
        version = _installed_version(dist)
        if version is not None:
            return version, dist
    version = _module_version(module)
    return (version, None) if version else (None, None)


def _no_mmcv_ops() -> dict:
    """The report's mmcv-ops keys before anything is known: no ops, and nothing about them."""
    return dict(
        mmcv_ops=False,
        **dict.fromkeys(
            ('mmcv_ops_backend', 'mmcv_ops_reason', 'mmcv_ops_cuda', 'mmcv_ops_compiler', 'mmcv_ops_error')
        ),
    )


def _mmcv_ops_info() -> dict:
    """Which ``mmcv._ext`` loads — compiled mmcv's, or mmdet-lrpq's torchvision backend
    (:mod:`mmdet_lrpq.ops`) — and, for compiled ops, what they were compiled with."""
    info = _no_mmcv_ops()
    import _mmdet_lrpq_mmcv  # its finder is in place: importing this package (mmdet_lrpq/__init__) installed it

    try:
        import torch  # noqa: F401  (a compiled mmcv._ext links against the loaded torch)

        ext = importlib.import_module('mmcv._ext')
    except Exception as err:  # ImportError/OSError (built for another torch, or MMDET_LRPQ_MMCV_OPS=compiled), ...
        info['mmcv_ops_error'] = f'{err.__class__.__name__}: {err}'
        return info
    chosen = _mmdet_lrpq_mmcv.backend()
    info.update(mmcv_ops=True, mmcv_ops_backend=chosen['backend'], mmcv_ops_reason=chosen['reason'])
    if chosen['backend'] == 'torchvision':
        return info
    try:
        cuda = ext.get_compiling_cuda_version()
        info['mmcv_ops_cuda'] = None if cuda in ('', 'not available') else cuda
        info['mmcv_ops_compiler'] = ext.get_compiler_version()
    except Exception as err:
        info['mmcv_ops_error'] = f'{err.__class__.__name__}: {err}'
    return info


def _torch_info() -> dict:
    info = dict(torch=None, torch_cuda=None, cuda_available=False, cuda_devices=[])
    version, _ = _version_of('torch', ('torch',))
    info['torch'] = version
    if version is None:
        return info
    try:
        import torch
    except Exception as err:
        info['torch_error'] = f'{err.__class__.__name__}: {err}'
        return info
    info['torch'] = torch.__version__
    info['torch_cuda'] = torch.version.cuda
    try:
        if torch.cuda.is_available():
            info['cuda_available'] = True
            info['cuda_devices'] = [
                f'{torch.cuda.get_device_name(i)} ({".".join(map(str, torch.cuda.get_device_capability(i)))})'
                for i in range(torch.cuda.device_count())
            ]
    except Exception as err:  # a broken driver is reported, not raised
        info['cuda_error'] = f'{err.__class__.__name__}: {err}'
    return info


def stack_report() -> dict:
    """Versions of the stack (None: not installed) and the state of mmcv's compiled ops.

    Keys: python, platform, torch, torch_cuda (torch.version.cuda), cuda_available, cuda_devices,
    torchvision, timm, mmengine, mmcv, mmcv_dist ('mmcv', 'mmcv-lite' or 'mmcv-full'), mmcv_ops
    (mmcv._ext loads), mmcv_ops_backend ('compiled', or 'torchvision': mmdet-lrpq's stand-in for a
    missing or unloadable mmcv._ext), mmcv_ops_reason (why that one), mmcv_ops_cuda (the CUDA
    version compiled ops were built with, None for CPU-only ops), mmcv_ops_compiler,
    mmcv_ops_error (why no mmcv._ext loads), mmdet.
    """
    report: dict = dict(python=platform.python_version(), platform=f'{sys.platform}-{platform.machine()}')
    report.update(_torch_info())
    report['torchvision'], _ = _version_of('torchvision', ('torchvision',))
    report['timm'], _ = _version_of('timm', ('timm',))
    report['mmengine'], _ = _version_of('mmengine', ('mmengine', 'mmengine-lite'))
    report['mmcv'], report['mmcv_dist'] = _version_of('mmcv', ('mmcv', 'mmcv-full', 'mmcv-lite'))
    report.update(_mmcv_ops_info() if report['mmcv'] is not None else _no_mmcv_ops())
    report['mmdet'], _ = _version_of('mmdet', ('mmdet',))
    return report


def format_report(report: dict) -> str:
    ops = (
        'not installed'
        if report.get('mmcv') is None
        else f'ops from the mmdet-lrpq torchvision backend, CPU and CUDA ({report.get("mmcv_ops_reason")})'
        if report.get('mmcv_ops_backend') == 'torchvision'
        else f'CUDA {report["mmcv_ops_cuda"]} ops'
        if report.get('mmcv_ops_cuda')
        else 'CPU ops'
        if report.get('mmcv_ops')
        else f'NO compiled ops ({report.get("mmcv_ops_error")})'
    )
    gpus = ', '.join(report.get('cuda_devices') or []) or 'none visible'
    rows = [
        ('python', report.get('python')),
        ('torch', f'{report.get("torch")} (CUDA {report.get("torch_cuda") or "-"}; GPUs: {gpus})'),
        ('torchvision', report.get('torchvision')),
        ('timm', report.get('timm')),
        ('mmengine', report.get('mmengine')),
        (
            'mmcv',
            f'{report.get("mmcv")} [{report.get("mmcv_dist") or "?"}]: {ops}'
            + (f', {report["mmcv_ops_compiler"]}' if report.get('mmcv_ops_compiler') else ''),
        ),
        ('mmdet', report.get('mmdet')),
    ]
    return '\n'.join(f'{name:>12}: {value}' for name, value in rows)


# --------------------------------------------------------------------------------------- check
def _version_problem(
    name: str,
    version: str | None,
    lo: str,
    hi: str | None = None,
    *,
    fix: str,
    why: str = '',
    missing_fix: str | None = None,
    missing_why: str = '',
    verb: str = 'needs',
) -> list[str]:
    """The problem of a package that is not installed (``missing_why``, ``missing_fix``) or outside
    [lo, hi) (``why``, ``fix``): none, or one message naming the version found and the range needed."""
    need = f'{name} >= {lo}' if hi is None else f'{name} >={lo},<{hi}'
    if version is None:
        return [f'{name} is not installed; mmdet-lrpq needs {need}{missing_why}: {missing_fix or fix}']
    if not _in_range(version, lo, hi):
        return [f'{name} {version} is installed, mmdet-lrpq {verb} {need}{why}: {fix}']
    return []


def _problems(r: dict, require_cuda_ops: bool) -> list[str]:
    problems: list[str] = []
    py = parse_version(r['python'])[:2]
    if py < PYTHON_MIN:
        problems.append(
            f'Python {r["python"]} is running, mmdet-lrpq needs Python >= {".".join(map(str, PYTHON_MIN))}: '
            f'create the environment with a newer Python (3.11 is the verified one)'
        )

    torch = r.get('torch')
    problems += _version_problem(
        'torch',
        torch,
        TORCH_MIN,
        why=' (safe weights-only checkpoint loading with an allow-list)',
        fix="upgrade torch (the build matching your CUDA version), then rebuild mmcv's ops against it",
        missing_fix=f'install the torch build for your CUDA version (or the CPU build), e.g. `pip install "torch>={TORCH_MIN}"`',
    )
    problems += _version_problem(
        'timm',
        r.get('timm'),
        TIMM_MIN,
        why=' (its Swin with always_partition)',
        fix=f'`pip install "timm>={TIMM_MIN}"`',
    )
    lo, hi = MMENGINE_RANGE
    problems += _version_problem('mmengine', r.get('mmengine'), lo, hi, fix=f'`pip install "mmengine>={lo},<{hi}"`')

    lo, hi = MMCV_RANGE
    mmcv, dist = r.get('mmcv'), r.get('mmcv_dist')
    if mmcv is None:
        problems.append(
            f'mmcv is not installed; mmdet-lrpq needs mmcv >={lo},<{hi}: `pip install mmcv-lite==2.1.0` '
            f'(no compiler needed: mmdet-lrpq provides its ops from torchvision), or mmcv 2.1.0 with '
            f'compiled ops: {BUILD_MMCV}'
        )
    elif dist == 'mmcv-full' or not _in_range(mmcv, '2.0.0a0'):
        problems.append(
            f'{dist or "mmcv"} {mmcv} is installed: that is the MMCV 1.x line of MMDetection 2; '
            f'mmdet-lrpq needs mmcv >={lo},<{hi} (MMDetection 3). `pip uninstall {dist or "mmcv"}`, '
            f'then install mmcv 2.1.0 with ops: {BUILD_MMCV}'
        )
    elif not _in_range(mmcv, lo, hi):
        problems.append(
            f'mmcv {mmcv} is installed, mmdet-lrpq needs mmcv >={lo},<{hi}: mmdet 3.x refuses '
            f'mmcv >= {hi} when it is imported. `pip uninstall {dist or "mmcv"}`, then '
            f'`pip install mmcv-lite==2.1.0` (no compiler: mmdet-lrpq provides its ops from torchvision) '
            f'or mmcv 2.1.0 with compiled ops: {BUILD_MMCV}'
        )
    elif not r.get('mmcv_ops'):
        error = r.get('mmcv_ops_error') or 'mmcv._ext is missing'
        why = (
            f'its ops were compiled against another torch than the installed torch {torch}'
            if 'undefined symbol' in error
            else 'no mmcv._ext loads'
        )
        problems.append(
            f'{dist or "mmcv"} {mmcv} is installed, but {why} ({error}). mmdet-lrpq provides '
            f'RoIAlign/NMS/... from torchvision when mmcv has no compiled ops, unless '
            f'MMDET_LRPQ_MMCV_OPS=compiled is set or mmcv.ops was imported before the hook was in '
            f'place: unset MMDET_LRPQ_MMCV_OPS, run `python -m _mmdet_lrpq_mmcv --install` once '
            f'(or import mmdet_lrpq before mmdet), or install mmcv with ops: {BUILD_MMCV}'
        )
    elif r.get('mmcv_ops_backend') == 'torchvision':
        pass  # the stand-in runs on every device torchvision runs on
    else:
        ops_cuda, torch_cuda = r.get('mmcv_ops_cuda'), r.get('torch_cuda')
        if ops_cuda and torch_cuda and ops_cuda.split('.')[0] != torch_cuda.split('.')[0]:
            problems.append(
                f"mmcv {mmcv}'s ops were compiled with CUDA {ops_cuda}, torch {torch} uses CUDA "
                f'{torch_cuda}: rebuild mmcv with ops and the CUDA toolkit {torch_cuda}: {BUILD_MMCV}'
            )
        elif require_cuda_ops and not ops_cuda:
            problems.append(
                f'mmcv {mmcv} has CPU-only ops, and CUDA ops were asked for: rebuild mmcv with '
                f'FORCE_CUDA=1 and the CUDA toolkit {torch_cuda or "of your torch"} '
                f'(`MMDET_LRPQ_CUDA=1 make install` in this repository does it; docs/install.md)'
            )

    lo, hi = MMDET_RANGE
    mmdet = r.get('mmdet')
    pip = f'`pip install --no-deps "mmdet>={lo},<{hi}"`'
    if mmdet is not None and not _in_range(mmdet, '3.0.0a0'):
        problems.append(
            f'mmdet {mmdet} is installed: that is MMDetection 2 (mmcv-full 1.x); mmdet-lrpq is a '
            f'plugin for MMDetection 3: {pip} together with mmengine and mmcv 2.x with ops'
        )
    else:
        problems += _version_problem(
            'mmdet',
            mmdet,
            lo,
            hi,
            verb='supports',
            fix=pip,
            missing_why=' (MMDetection 3)',
            missing_fix=f'{pip} once mmcv with ops is installed (without --no-deps pip may try to rebuild mmcv)',
        )
    return problems


_checked: dict | None = None


def check_openmmlab_stack(report: dict | None = None, require_cuda_ops: bool = False) -> dict:
    """Raise :class:`OpenMMLabStackError` (an ImportError and a RuntimeError) naming every problem
    of the installed stack; return the report when it fits.

    ``report`` defaults to :func:`stack_report` (computed once per process when it passes).
    ``require_cuda_ops=True`` also refuses mmcv ops compiled without CUDA. Otherwise CPU-only ops
    next to a visible GPU give a warning: detectors then only run on the CPU.
    """
    global _checked
    if report is None and _checked is not None and not require_cuda_ops:
        return _checked
    r = stack_report() if report is None else report
    problems = _problems(r, require_cuda_ops)
    if problems:
        raise OpenMMLabStackError(
            'mmdet-lrpq cannot run on the installed OpenMMLab stack:\n'
            + '\n'.join(f'  - {p}' for p in problems)
            + f'\ninstalled:\n{format_report(r)}\n(docs/install.md explains the supported set-ups)'
        )
    if (
        r.get('cuda_available')
        and r.get('mmcv_ops')
        and r.get('mmcv_ops_backend') != 'torchvision'
        and not r.get('mmcv_ops_cuda')
    ):
        warnings.warn(
            f"mmcv {r['mmcv']} has CPU-only ops but a GPU is visible: mmcv's ops (RoIAlign, NMS) will "
            f'fail on CUDA tensors, so run detectors on the CPU or rebuild mmcv with CUDA ops '
            f'(docs/install.md)',
            RuntimeWarning,
            stacklevel=2,
        )
    if report is None:
        _checked = r
    return r


def print_and_check() -> tuple[dict, OpenMMLabStackError | None]:
    """Print the installed stack, then check it: the report, and the error that says why it cannot
    run mmdet-lrpq (None when it can)."""
    report = stack_report()
    print(format_report(report))
    try:
        check_openmmlab_stack(report)
    except OpenMMLabStackError as err:
        return report, err
    return report, None


def main() -> int:
    _, error = print_and_check()
    if error is not None:
        print(f'\n{error}', file=sys.stderr)
        return 1
    print('\nstack ok for mmdet-lrpq')
    return 0


if __name__ == '__main__':
    sys.exit(main())
