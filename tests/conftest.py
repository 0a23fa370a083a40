"""Shared fixtures: where the real data lives, and skipping cleanly when it does not."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # test helpers (repq_reference, ...)

# Real COCO / ImageNet images (../shared/data, see its README). Never copied into the repo.
SHARED_DATA = Path(os.environ.get('MMDET_LRPQ_SHARED_DATA', REPO.parent / 'shared' / 'data'))


def shared_data(*parts: str) -> Path:
    """Path under the shared real-data folder, or skip the test saying what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f'real data not available: {path} does not exist (set MMDET_LRPQ_SHARED_DATA '
            f'to a folder with coco_mini/ and imagenet_sample/ to run this test)'
        )
    return path


@pytest.fixture
def coco_mini() -> Path:
    return shared_data('coco_mini')


@pytest.fixture
def imagenet_sample() -> Path:
    return shared_data('imagenet_sample')


# ------------------------------------------------------------------------------ devices
import contextlib  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
from collections.abc import Iterator, Mapping  # noqa: E402

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._device import _device_constructors  # noqa: E402

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch) -> torch.device:
    """Every device this machine has (CPU always). On CUDA, float32 matmuls and convolutions run in
    full precision (no TF32), so that comparisons with the CPU differ only by summation order."""
    if request.param == 'cuda':
        monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
        monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    return torch.device(request.param)


_SPEC = importlib.util.find_spec('mmdet_lrpq')  # where it is imported from (an install or the checkout)
LIBRARY = Path(_SPEC.origin).resolve().parent if _SPEC is not None else REPO / 'mmdet_lrpq'
_TORCH_DIR = str(Path(torch.__file__).parent)
# What torch's own default-device mode redirects (torch.tensor, arange, zeros, full, ...), plus the
# constructors that can only make CPU tensors.
_FACTORIES = frozenset(_device_constructors()) | {torch.from_numpy, torch.frombuffer}
_TAKES_TENSORS = frozenset({torch.as_tensor, torch.asarray})  # a tensor argument keeps its device
_OFF_DEVICE = {torch.Tensor.cpu: '.cpu()', torch.Tensor.numpy: '.numpy()'}

# Library code that makes CPU tensors on purpose: (path under mmdet_lrpq/, function) -> why.
DEVICE_AUDIT_ALLOWED: dict[tuple[str, str], str] = {
    (
        'quant/modules.py',
        '_Scratch.get',
    ): 'output buffer of the fused CPU float32 kernels; requested only for CPU float32 inputs',
}


@functools.cache
def _library_file(filename: str) -> str | None:
    """``filename`` relative to the ``mmdet_lrpq`` package, ``None`` outside it."""
    path = Path(filename).resolve()
    return path.relative_to(LIBRARY).as_posix() if LIBRARY in path.parents else None


class _DeviceAudit(TorchFunctionMode):
    """Records every tensor that library code makes without following an input's device."""

    def __init__(self, allowed: Mapping[tuple[str, str], str]):
        super().__init__()
        self.allowed = allowed
        self.violations: dict[str, None] = {}  # ordered set of messages

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES:
            follows = kwargs.get('device') is not None or (
                func in _TAKES_TENSORS and args and isinstance(args[0], torch.Tensor)
            )
            if not follows:
                self._check(f'torch.{func.__name__}(...) without device=')
        elif func in _OFF_DEVICE:
            self._check(f'{_OFF_DEVICE[func]} moves a tensor off its device')
        return func(*args, **kwargs)

    def _check(self, what: str) -> None:
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
            frame = frame.f_back  # torch's Python wrappers: the caller is the one to judge
        module_file = _library_file(frame.f_code.co_filename) if frame is not None else None
        if module_file is None:
            return
        where = (module_file, frame.f_code.co_qualname)
        if where not in self.allowed:
            self.violations[f'mmdet_lrpq/{where[0]}:{frame.f_lineno} in {where[1]}: {what}'] = None


@contextlib.contextmanager
def audit_devices(allow: Mapping[tuple[str, str], str] | None = None) -> Iterator[_DeviceAudit]:
    """Fail if code of the ``mmdet_lrpq`` package, run inside, makes a tensor that does not follow
    its inputs' device: a factory call (``torch.tensor``, ``arange``, ``zeros``, ``full``, ...)
    without ``device=``, ``from_numpy``, ``.cpu()``, ``.numpy()``. On a CPU-only machine such a tensor
    lands on the right device by luck; on CUDA it breaks or silently computes on the CPU.

    ``allow``: extra ``(path under mmdet_lrpq/, function qualname) -> reason`` exemptions, on top of
    ``DEVICE_AUDIT_ALLOWED``. Torch-internal and third-party (timm, mmdet) calls are not judged.
    """
    audit = _DeviceAudit({**DEVICE_AUDIT_ALLOWED, **(allow or {})})
    with audit:
        yield audit
    if audit.violations:
        pytest.fail(
            'library code made tensors that do not follow the input device:\n  ' + '\n  '.join(audit.violations),
            pytrace=False,
        )


@pytest.fixture
def device_audit():
    """``with device_audit(): ...`` (see :func:`audit_devices`), e.g. around calibration + forward."""
    return audit_devices


def randomize_(model, seed: int, norm_std: float = 0.2):
    """Random biases, relative-position tables and LayerNorm affines (timm initialises them to 0 /
    identity), so that every rule and quantizer sees non-trivial values; returns the model in eval mode."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('bias') or 'relative_position_bias_table' in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif 'norm' in name:
                p.copy_(1 + norm_std * torch.randn(p.shape, generator=gen))
    return model.eval()
