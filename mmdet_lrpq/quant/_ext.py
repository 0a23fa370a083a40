"""Loader of the fused CPU kernels in ``csrc/fused_quant.cpp`` (built once per machine).

The kernels compute exactly the float operations of the PyTorch path in
:mod:`mmdet_lrpq.quant.functional`, in one pass instead of four or five; tests compare both paths
bit for bit. They are compiled at first use with ``torch.utils.cpp_extension`` (the C++ toolchain
that builds mmcv; ``make install`` builds them ahead) into
``~/.cache/mmdet-lrpq/ext/<torch>-<cpu>/`` and loaded from there afterwards.

If they cannot be built (no compiler, ...), a warning says why once and the PyTorch path is used:
same numbers, slower calibration. ``MMDET_LRPQ_NO_EXT=1`` forces the PyTorch path.
"""
from __future__ import annotations

import hashlib
import logging
import os
import os.path as osp
import platform
import warnings
from typing import Optional

import torch

_SOURCE = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc', 'fused_quant.cpp')
_state: dict = {}


def _cpu_tag() -> str:
    """Build directory key: -march=native code must not be reused on another CPU model."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line for line in f if line.startswith('flags')), '')
    except OSError:
        flags = ''
    return hashlib.sha1(f'{platform.machine()} {flags}'.encode()).hexdigest()[:10]


def build_dir() -> str:
    root = os.environ.get('MMDET_LRPQ_EXT_DIR', osp.expanduser('~/.cache/mmdet-lrpq/ext'))
    return osp.join(root, f'torch-{torch.__version__.split("+")[0]}-{_cpu_tag()}')


def kernels(verbose: bool = False) -> Optional[object]:
    """The compiled module, or ``None`` where the PyTorch path must be used."""
    if os.environ.get('MMDET_LRPQ_NO_EXT', '') not in ('', '0'):
        return None
    if 'module' not in _state:
        try:
            # (importing it logs a CUDA_HOME warning on CPU-only machines; irrelevant here)
            logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
            from torch.utils.cpp_extension import load
            os.makedirs(build_dir(), exist_ok=True)
            native = ['-march=native'] if platform.machine() in ('x86_64', 'AMD64') else []
            _state['module'] = load(
                name='mmdet_lrpq_fused_quant', sources=[_SOURCE], build_directory=build_dir(),
                extra_cflags=['-O3', '-fopenmp', '-ffp-contract=off', '-fno-math-errno', *native],
                extra_ldflags=['-fopenmp'], verbose=verbose)
        except Exception as exc:  # noqa: BLE001 -- any build failure means: use the PyTorch path
            warnings.warn(f'mmdet_lrpq: fused CPU quantization kernels unavailable ({type(exc).__name__}: '
                          f'{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}); using the '
                          'PyTorch path (same numbers, slower calibration). Build log: rerun with '
                          'python -c "from mmdet_lrpq.quant._ext import kernels; kernels(verbose=True)"',
                          stacklevel=2)
            _state['module'] = None
    return _state['module']
