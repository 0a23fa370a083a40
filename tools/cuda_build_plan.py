#!/usr/bin/env python3
"""Decide whether ``make install`` builds mmcv's ops with CUDA or for the CPU only.

Run with the Python of the environment being installed (it reads that environment's torch).
Prints the decision as ``key=value`` lines, which ``tools/install.sh`` reads::

    ops=cuda                  # or cpu
    reason=nvcc 13.0 matches torch CUDA 13.0, a GPU is visible (NVIDIA H200 (9.0)): building CUDA ops for 9.0 (from the visible GPUs)
    torch_cuda=13.0           # torch.version.cuda ('' for a CPU-only torch build)
    nvcc=/usr/local/cuda/bin/nvcc
    nvcc_cuda=13.0            # the release `nvcc --version` reports
    cuda_home=/usr/local/cuda # what the mmcv build gets as CUDA_HOME
    gpus=NVIDIA H200 (9.0)
    arch_list=9.0             # TORCH_CUDA_ARCH_LIST for the build
    cache_key=cu130-sm90      # the wheel-cache folder suffix ('cpu' for the CPU build)

CUDA ops are built when an nvcc is found (``$CUDA_HOME/bin/nvcc``, else ``$CUDA_PATH/bin/nvcc``,
else ``nvcc`` on PATH, else ``/usr/local/cuda/bin/nvcc``: the order torch's extension builder
uses) whose ``major.minor`` release equals torch's CUDA version, in a toolkit with the CUDA
runtime's headers and ``libcudart.so``, and either a GPU is visible or ``MMDET_LRPQ_CUDA=1``; the
architectures must be ones that nvcc can compile for. The pinned torch wheel is a CUDA build even
on machines without a GPU, so torch alone decides nothing.

* ``MMDET_LRPQ_CUDA=1`` insists on CUDA ops: anything that prevents them is an error (exit 2,
  the reason on stderr) instead of a silent CPU build. Without a GPU, ``TORCH_CUDA_ARCH_LIST``
  must then say which GPU architectures to compile for.
* ``MMDET_LRPQ_CUDA=0`` builds the CPU ops even where CUDA would be possible.
* ``TORCH_CUDA_ARCH_LIST`` (e.g. ``9.0`` or ``8.6;9.0+PTX``) overrides the architectures of the
  visible GPUs.

The GPU check asks ``torch.cuda`` only where an NVIDIA device node or ``nvidia-smi`` exists, so
on a machine without one the plan takes a fraction of a second (torch is not imported).
``--torch-cuda`` and ``--gpus`` replace the detection (what-if questions, tests).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

KEYS = ('ops', 'reason', 'torch_cuda', 'nvcc', 'nvcc_cuda', 'cuda_home', 'gpus', 'arch_list', 'cache_key')
ARCH_EXAMPLES = 'e.g. TORCH_CUDA_ARCH_LIST=9.0 for H100/H200, 8.9 for L4/RTX 40xx, 8.6 for A10/RTX 30xx, 8.0 for A100'
DEFAULT_CUDA_HOME = '/usr/local/cuda'  # torch's last guess too
_ARCH = re.compile(r'^(\d+)\.(\d+)([a-z]?)(\+PTX)?$')
_NAMED_ARCHS = {
    'kepler+tesla',
    'kepler',
    'maxwell+tegra',
    'maxwell',
    'pascal',
    'volta+tegra',
    'volta',
    'turing',
    'ampere+tegra',
    'ampere',
    'ada',
    'hopper',
    'blackwell+tegra',
    'blackwell',
}


class PlanError(Exception):
    """CUDA ops were asked for (MMDET_LRPQ_CUDA=1) but cannot be built; the message says why."""


@dataclass
class Gpu:
    name: str
    capability: str  # 'major.minor'

    def __str__(self) -> str:
        return f'{self.name} ({self.capability})'


@dataclass
class Facts:
    """Everything the decision depends on (collected by :func:`collect`, or given by a test)."""

    torch_version: str
    torch_cuda: str | None
    nvcc: str | None  # path of the nvcc the build would use, None if there is none
    nvcc_cuda: str | None  # its 'major.minor', None if `nvcc --version` did not say
    nvcc_problem: str  # why there is no usable nvcc ('' if there is one)
    cuda_home: str | None
    toolkit_problem: str = ''  # what the CUDA home lacks for building ('' if complete)
    nvcc_archs: list[str] = field(default_factory=list)  # `nvcc --list-gpu-arch` as '9.0', ... ([]: unknown)
    gpus: list[Gpu] = field(default_factory=list)
    gpu_note: str = ''  # e.g. nvidia-smi sees GPUs that torch cannot use
    mode: str = ''  # MMDET_LRPQ_CUDA: '' (auto), '0' or '1'
    arch_env: str = ''  # TORCH_CUDA_ARCH_LIST from the environment


# ----------------------------------------------------------------------------------- detection
def torch_cuda_version() -> tuple[str, str | None]:
    """(torch.__version__, torch.version.cuda) of the running Python, without importing torch."""
    spec = importlib.util.find_spec('torch')
    if spec is None or not spec.submodule_search_locations:
        raise PlanError(f'torch is not installed for {sys.executable}')
    path = os.path.join(list(spec.submodule_search_locations)[0], 'version.py')
    try:
        namespace: dict = {}
        with open(path) as f:
            exec(compile(f.read(), path, 'exec'), namespace)  # torch/version.py: plain assignments
        return str(namespace['__version__']), namespace.get('cuda')
    except (OSError, KeyError, SyntaxError, ImportError):
        import torch

        return torch.__version__, torch.version.cuda


def find_nvcc(env: dict) -> tuple[str | None, str | None, str]:
    """(nvcc path, CUDA home, problem) in the order torch.utils.cpp_extension looks for them."""
    for var in ('CUDA_HOME', 'CUDA_PATH'):
        home = env.get(var)
        if home:
            nvcc = os.path.join(home, 'bin', 'nvcc')
            if os.access(nvcc, os.X_OK):
                return nvcc, home, ''
            return None, home, f'{var}={home} has no bin/nvcc'
    nvcc = shutil.which('nvcc', path=env.get('PATH', os.defpath))
    if nvcc:
        return nvcc, os.path.dirname(os.path.dirname(nvcc)), ''
    nvcc = os.path.join(DEFAULT_CUDA_HOME, 'bin', 'nvcc')
    if os.access(nvcc, os.X_OK):
        return nvcc, DEFAULT_CUDA_HOME, ''
    return None, None, f'no nvcc found (CUDA_HOME/CUDA_PATH unset, none on PATH, none in {DEFAULT_CUDA_HOME})'


def nvcc_release(nvcc: str, env: dict) -> tuple[str | None, str]:
    """('major.minor', problem) from `nvcc --version` ('Cuda compilation tools, release 13.0, V13.0.88')."""
    try:
        out = subprocess.run([nvcc, '--version'], capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f'{nvcc} --version failed ({err})'
    match = re.search(r'release (\d+)\.(\d+)', out.stdout + out.stderr)
    if out.returncode != 0 or not match:
        return None, f'{nvcc} --version did not report a CUDA release (exit {out.returncode})'
    return f'{match.group(1)}.{match.group(2)}', ''


def nvcc_archs(nvcc: str, env: dict) -> list[str]:
    """The compute capabilities this nvcc compiles for ('compute_90' -> '9.0'); [] if it does not say."""
    try:
        out = subprocess.run([nvcc, '--list-gpu-arch'], capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return (
        [f'{int(m[:-1])}.{m[-1]}' for m in re.findall(r'\bcompute_(\d+)\b', out.stdout)] if out.returncode == 0 else []
    )


def _has_headers(home: str | None) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, 'include', 'cuda_runtime_api.h'))


def resolve_cuda_home(nvcc: str, home: str, env: dict) -> str:
    """The toolkit an nvcc belongs to, also when it is a symlink or wrapper script elsewhere.

    torch takes ``dirname(dirname(which nvcc))``; for ``/usr/local/bin/nvcc`` (a wrapper that
    execs ``/usr/local/cuda-13.0/bin/nvcc``) that is ``/usr/local``, which has no CUDA headers.
    nvcc's dry run names its real top directory (``#$ TOP=/usr/local/cuda-13.0/bin/..``).
    """
    if _has_headers(home):
        return home
    real = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _has_headers(real):
        return real
    try:
        out = subprocess.run(
            [nvcc, '-dryrun', '-c', '-x', 'cu', os.devnull, '-o', os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        top = re.search(r'^#\$ TOP=(.+)$', out.stdout + out.stderr, re.M)
    except (OSError, subprocess.TimeoutExpired):
        top = None
    if top and _has_headers(os.path.normpath(top.group(1).strip())):
        return os.path.normpath(top.group(1).strip())
    return home


def toolkit_problem(home: str) -> str:
    """What a CUDA home lacks for compiling and linking mmcv's CUDA ops ('' if nothing)."""
    if not _has_headers(home):
        return f'the CUDA toolkit at {home} has no include/cuda_runtime_api.h (set CUDA_HOME to the toolkit)'
    libs = [os.path.join(home, d, 'libcudart.so') for d in ('lib64', 'lib')]
    if not any(os.path.exists(lib) for lib in libs):
        versioned = sorted(glob.glob(os.path.join(home, 'lib*', 'libcudart.so.*')))
        hint = f' (it has {versioned[0]}: link libcudart.so to it)' if versioned else ''
        return f'the CUDA toolkit at {home} has no lib64/libcudart.so to link against{hint}'
    return ''


def detect_gpus(env: dict) -> tuple[list[Gpu], str]:
    """The GPUs torch can use, and a note when nvidia-smi sees GPUs that torch cannot use."""
    smi = shutil.which('nvidia-smi', path=env.get('PATH', os.defpath))
    if not smi and not glob.glob('/dev/nvidia[0-9]*') and not os.path.exists('/dev/dxg'):
        return [], ''  # no driver, no device: torch.cuda would say the same, after seconds
    gpus: list[Gpu] = []
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(i)
                gpus.append(Gpu(torch.cuda.get_device_name(i), f'{major}.{minor}'))
    except Exception as err:  # a broken driver must not break the install: build for the CPU
        return [], f'torch.cuda failed ({err.__class__.__name__}: {err})'
    if gpus or not smi:
        return gpus, ''
    try:
        out = subprocess.run(
            [smi, '--query-gpu=name,compute_cap', '--format=csv,noheader'], capture_output=True, text=True, timeout=60
        )
        seen = [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        seen = []
    if seen:
        return [], (
            f'nvidia-smi lists {len(seen)} GPU(s) ({"; ".join(seen)}) but torch cannot use them '
            f"(is the driver too old for torch's CUDA?)"
        )
    return [], ''


def parse_gpus(text: str) -> list[Gpu]:
    """--gpus '9.0,8.6' or 'NAME=9.0,...' ('' or 'none': no GPU)."""
    gpus = []
    for i, item in enumerate(t.strip() for t in text.split(',')):
        if item and item != 'none':
            name, _, cap = item.rpartition('=')
            gpus.append(Gpu(name or f'GPU {i}', cap))
    return gpus


def collect(env: dict, torch_cuda: str | None = None, gpus: str | None = None) -> Facts:
    if torch_cuda is None:
        torch_version, cuda = torch_cuda_version()
    else:
        torch_version, cuda = 'given', (None if torch_cuda in ('', 'none') else torch_cuda)
    nvcc, cuda_home, problem = find_nvcc(env)
    nvcc_cuda, missing, archs = None, '', []
    if nvcc:
        nvcc_cuda, problem = nvcc_release(nvcc, env)
        if nvcc_cuda:
            if not (env.get('CUDA_HOME') or env.get('CUDA_PATH')):
                cuda_home = resolve_cuda_home(nvcc, cuda_home, env)
            missing = toolkit_problem(cuda_home)
            archs = nvcc_archs(nvcc, env)
    if gpus is None:
        gpu_list, note = detect_gpus(env)
    else:
        gpu_list, note = parse_gpus(gpus), ''
    return Facts(
        torch_version=torch_version,
        torch_cuda=cuda,
        nvcc=nvcc,
        nvcc_cuda=nvcc_cuda,
        nvcc_problem=problem,
        cuda_home=cuda_home,
        toolkit_problem=missing,
        nvcc_archs=archs,
        gpus=gpu_list,
        gpu_note=note,
        mode=env.get('MMDET_LRPQ_CUDA', '').strip(),
        arch_env=env.get('TORCH_CUDA_ARCH_LIST', '').strip(),
    )


# ------------------------------------------------------------------------------------ decision
def normalize_arch_list(text: str) -> list[str]:
    """'8.6;9.0+PTX' / '8.6 9.0' -> ['8.6', '9.0+PTX'], sorted and unique; PlanError if malformed."""

    def order(arch: str) -> tuple:
        m = _ARCH.match(arch)
        return (int(m.group(1)), int(m.group(2)), arch) if m else (1000, 0, arch)

    archs = sorted({a for a in re.split(r'[;\s,]+', text.strip()) if a}, key=order)
    bad = [a for a in archs if not _ARCH.match(a) and a.lower() not in _NAMED_ARCHS]
    if bad or not archs:
        raise PlanError(
            f'TORCH_CUDA_ARCH_LIST={text!r} is not a list of compute capabilities ({ARCH_EXAMPLES}; several: "8.6;9.0")'
        )
    return archs


def cache_key(cuda: str, archs: list[str]) -> str:
    """'13.0', ['8.6', '9.0+PTX'] -> 'cu130-sm86-sm90+ptx' (a folder name)."""
    tags = []
    for arch in archs:
        m = _ARCH.match(arch)
        tags.append(
            f'sm{m.group(1)}{m.group(2)}{m.group(3)}{"+ptx" if m.group(4) else ""}'
            if m
            else re.sub(r'[^a-z0-9+]', '', arch.lower())
        )
    return f'cu{cuda.replace(".", "")}-' + '-'.join(tags)


def decide(f: Facts) -> dict:
    """The plan for facts ``f`` (a dict with :data:`KEYS`), or PlanError when MMDET_LRPQ_CUDA=1 cannot be met."""
    plan = dict(
        ops='cpu',
        reason='',
        torch_cuda=f.torch_cuda or '',
        nvcc=f.nvcc or '',
        nvcc_cuda=f.nvcc_cuda or '',
        cuda_home=f.cuda_home or '',
        gpus='; '.join(map(str, f.gpus)),
        arch_list='',
        cache_key='cpu',
    )
    if f.mode not in ('', '0', '1'):
        raise PlanError(f'MMDET_LRPQ_CUDA={f.mode!r}: use 1 (build CUDA ops), 0 (CPU ops) or leave it unset (detect)')
    forced = f.mode == '1'
    gpu_text = f'a GPU is visible ({plan["gpus"]})' if f.gpus else 'no GPU is visible'
    if f.gpu_note:
        gpu_text += f' ({f.gpu_note})'
    cpu_only = "; mmcv's ops (RoIAlign, NMS) will then only run on CPU tensors" if f.gpus else ''

    def cpu(why: str) -> dict:
        plan['reason'] = f'{why}: building CPU ops{cpu_only}'
        return plan

    if f.mode == '0':
        return cpu('MMDET_LRPQ_CUDA=0')
    if not f.torch_cuda:
        if forced:
            raise PlanError(
                f'MMDET_LRPQ_CUDA=1, but torch {f.torch_version} is a CPU-only build: '
                f"install a CUDA build of torch to compile mmcv's CUDA ops"
            )
        return cpu(f'torch {f.torch_version} is a CPU-only build')
    if not f.nvcc_cuda:
        if forced:
            raise PlanError(
                f'MMDET_LRPQ_CUDA=1, but {f.nvcc_problem}: install the CUDA toolkit '
                f'{f.torch_cuda} (the version torch was built with) and put its bin/ on PATH '
                f'or set CUDA_HOME to it'
            )
        return cpu(f'{f.nvcc_problem}; {gpu_text}')
    if f.nvcc_cuda != f.torch_cuda:
        why = f'nvcc {f.nvcc_cuda} ({f.nvcc}) != torch CUDA {f.torch_cuda}'
        if forced:
            raise PlanError(
                f"MMDET_LRPQ_CUDA=1, but {why}: mmcv's CUDA ops must be compiled with the "
                f'CUDA version torch was built with; install CUDA toolkit {f.torch_cuda} and '
                f'point CUDA_HOME (or PATH) at it'
            )
        return cpu(why)
    match_text = f'nvcc {f.nvcc_cuda} matches torch CUDA {f.torch_cuda}'
    if f.toolkit_problem:
        if forced:
            raise PlanError(f'MMDET_LRPQ_CUDA=1 and {match_text}, but {f.toolkit_problem}')
        return cpu(f'{match_text}, but {f.toolkit_problem}')
    if not f.gpus and not forced:
        return cpu(
            f'{match_text} but {gpu_text} (set MMDET_LRPQ_CUDA=1 and TORCH_CUDA_ARCH_LIST to build CUDA ops anyway)'
        )
    if f.arch_env:
        archs, arch_source = normalize_arch_list(f.arch_env), 'TORCH_CUDA_ARCH_LIST'
    elif f.gpus:
        archs, arch_source = normalize_arch_list(';'.join(g.capability for g in f.gpus)), 'the visible GPUs'
    else:
        raise PlanError(
            f'MMDET_LRPQ_CUDA=1 and {match_text}, but no GPU is visible to take the '
            f'architecture from: set TORCH_CUDA_ARCH_LIST ({ARCH_EXAMPLES})'
        )
    unsupported = [
        a
        for a in archs
        if _ARCH.match(a) and f.nvcc_archs and '.'.join(_ARCH.match(a).groups()[:2]) not in f.nvcc_archs
    ]
    if unsupported:
        why = (
            f'nvcc {f.nvcc_cuda} cannot compile for {";".join(unsupported)} (from {arch_source}; it '
            f'supports {" ".join(f.nvcc_archs)})'
        )
        if forced or f.arch_env:
            raise PlanError(f'{why}: set TORCH_CUDA_ARCH_LIST to supported architectures')
        return cpu(why)
    plan.update(ops='cuda', arch_list=';'.join(archs), cache_key=cache_key(f.torch_cuda, archs))
    why = 'MMDET_LRPQ_CUDA=1' if forced else gpu_text
    plan['reason'] = f'{match_text}, {why}: building CUDA ops for {plan["arch_list"]} (from {arch_source})'
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--torch-cuda',
        help="use this as torch's CUDA version instead of the installed torch's ('none': a CPU-only torch)",
    )
    parser.add_argument(
        '--gpus', help="use these GPUs instead of detecting them: '9.0,8.6' or 'NAME=9.0,...' ('none': no GPU)"
    )
    args = parser.parse_args(argv)
    try:
        plan = decide(collect(dict(os.environ), torch_cuda=args.torch_cuda, gpus=args.gpus))
    except PlanError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    for key in KEYS:
        print(f'{key}={plan[key]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
