"""The fused CPU kernels in ``csrc/fused_quant.cpp``: their loader (built once per machine), their
interface, and the tensor layouts they take (:func:`fused_layout`, :func:`strided_rows`).

The kernels compute exactly the float operations of the PyTorch path in :mod:`.functional` and
:mod:`.quantiles`, in one pass instead of four or five; tests compare both paths bit for bit. They
are compiled at first use with ``torch.utils.cpp_extension`` (the C++ toolchain that builds mmcv;
``make install`` builds them ahead) into ``~/.cache/mmdet-lrpq/ext/torch-<version>-<key>/`` and
loaded from there afterwards. The key hashes
everything the build depends on — the CPU's flags (``-march=native``), the source's path and
content, the compiler flags, the torch installation and the Python headers — so that two checkouts or virtual
environments on one machine (a CI checkout next to a working copy) each keep their own build
instead of recompiling over each other's (ninja rebuilds when the command line changes: a minute
of compilation inside the next calibration), and an edited source never loads a stale build.

If they cannot be built (no compiler, ...), a warning says why once and the PyTorch path is used:
same numbers, slower calibration. ``MMDET_LRPQ_NO_EXT=1`` forces the PyTorch path.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import os.path as osp
import platform
import sysconfig
import warnings
from typing import Protocol

import torch
from torch import Tensor

_SOURCE = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc', 'fused_quant.cpp')
_state: dict = {}


_CFLAGS = [
    '-O3',
    '-fopenmp',
    '-ffp-contract=off',
    '-fno-math-errno',
    *(['-march=native'] if platform.machine() in ('x86_64', 'AMD64') else []),
]
_LDFLAGS = ['-fopenmp']


def _build_key() -> str:
    """Hash of what the build depends on (see the module docstring)."""
    try:
        with open('/proc/cpuinfo') as f:
            cpu_flags = next((line for line in f if line.startswith('flags')), '')
    except OSError:
        cpu_flags = ''
    with open(_SOURCE, 'rb') as f:
        source = hashlib.sha1(f.read()).hexdigest()
    parts = [
        platform.machine(),
        cpu_flags,
        _SOURCE,
        source,
        ' '.join(_CFLAGS + _LDFLAGS),
        osp.dirname(torch.__file__),
        torch.__version__,
        sysconfig.get_paths().get('include', ''),
    ]
    return hashlib.sha1('\n'.join(parts).encode()).hexdigest()[:12]


def build_dir() -> str:
    root = os.environ.get('MMDET_LRPQ_EXT_DIR', osp.expanduser('~/.cache/mmdet-lrpq/ext'))
    return osp.join(root, f'torch-{torch.__version__.split("+")[0]}-{_build_key()}')


class FusedKernels(Protocol):
    """The functions ``csrc/fused_quant.cpp`` exports (its ``PYBIND11_MODULE`` block), as typed for mypy."""

    def uniform_sq_err(self, rows: Tensor, delta: Tensor, zero_point: Tensor, levels: int) -> Tensor: ...

    def fake_quant_uniform(
        self, x: Tensor, delta: Tensor, zero_point: Tensor, levels: int, inner: int, scratch: Tensor | None
    ) -> Tensor: ...

    def row_tails(self, rows: Tensor, k_top: int, k_bot: int) -> tuple[Tensor, Tensor, Tensor]: ...

    def tails_beyond(self, flat: Tensor, hi: float, lo: float) -> tuple[Tensor, int, Tensor, int]: ...

    def fake_quant_uniform_rows(
        self, x: Tensor, delta: Tensor, zero_point: Tensor, levels: int, scratch: Tensor | None
    ) -> Tensor: ...

    def log_sqrt2_fake_quant(self, x: Tensor, delta: Tensor, table: Tensor, scratch: Tensor | None) -> Tensor: ...

    def log_sqrt2_sq_err(self, x: Tensor, delta: Tensor, table: Tensor) -> float: ...


def kernels(verbose: bool = False) -> FusedKernels | None:
    """The compiled module, or ``None`` where the PyTorch path must be used."""
    if os.environ.get('MMDET_LRPQ_NO_EXT', '') not in ('', '0'):
        return None
    if 'module' not in _state:
        try:
            # (importing it logs a CUDA_HOME warning on CPU-only machines; irrelevant here)
            logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
            from torch.utils.cpp_extension import load

            directory = build_dir()
            os.makedirs(directory, exist_ok=True)
            _state['module'] = load(
                name='mmdet_lrpq_fused_quant',
                sources=[_SOURCE],
                build_directory=directory,
                extra_cflags=list(_CFLAGS),
                extra_ldflags=list(_LDFLAGS),
                verbose=verbose,
            )  # load() appends to them
        except Exception as exc:
            warnings.warn(
                f'mmdet_lrpq: fused CPU quantization kernels unavailable ({type(exc).__name__}: '
                f'{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}); using the '
                'PyTorch path (same numbers, slower calibration). Build log: rerun with '
                'python -c "from mmdet_lrpq.quant._ext import kernels; kernels(verbose=True)"',
                stacklevel=2,
            )
            _state['module'] = None
    return _state['module']


# ----------------------------------------------------------------------------- layouts they take
def fused_layout(x: Tensor, delta: Tensor) -> int | None:
    """Where the fused kernel applies (float32 CPU, no autograd, Δ per tensor or along one axis of
    ``x``): the number of elements per channel run (``inner``); else ``None``."""
    if x.device.type != 'cpu' or x.dtype != torch.float32 or delta.dtype != torch.float32 or x.dim() == 0:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or delta.requires_grad):
        return None
    if delta.numel() == 1:
        return x.numel()
    if delta.dim() > x.dim() or not x.is_contiguous():  # (keeps the output layout PyTorch's path gives)
        return None
    shape = (1,) * (x.dim() - delta.dim()) + tuple(delta.shape)
    axes = [a for a, s in enumerate(shape) if s != 1]
    if len(axes) != 1 or shape[axes[0]] != x.shape[axes[0]]:
        return None
    return math.prod(x.shape[axes[0] + 1 :])


def is_dense(x: Tensor) -> bool:
    """Non-overlapping and dense: some permutation of ``x`` is contiguous (PyTorch's C++ test)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(x.shape, x.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def strided_rows(x: Tensor) -> tuple[Tensor, list[int]] | None:
    """``x`` (not dense, e.g. q/k/v sliced out of a fused qkv output) as a 2-D view ``[R, L]`` with
    unit inner stride and one row stride, with its dims ordered as PyTorch's element-wise ops order
    their output (by decreasing input stride); ``None`` if it does not collapse that way."""
    order = sorted(range(x.dim()), key=lambda d: x.stride(d), reverse=True)
    dims = [(x.shape[d], x.stride(d)) for d in order if x.shape[d] != 1]
    if not dims or dims[-1][1] != 1:
        return None
    inner = 1
    while dims and dims[-1][1] == inner:  # the contiguous inner run
        inner *= dims.pop()[0]
    rows, row_stride = 1, None
    for size, stride in reversed(dims):  # the rest must be rows of one stride
        if row_stride is None:
            row_stride = stride
        elif stride != row_stride * rows:
            return None
        rows *= size
    view = x.as_strided((rows, inner), (row_stride or inner, 1), x.storage_offset())
    return view, order
