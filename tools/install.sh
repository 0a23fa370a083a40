#!/usr/bin/env bash
# One-command set-up for mmdet-lrpq (called by `make install`; docs/install.md).
#
# Creates .venv/ at the repository root with the verified stack of DESIGN §5 and the package in
# editable mode. mmcv comes in one of two forms (MMDET_LRPQ_MMCV, `make install MMCV=...`):
#   lite (default)  mmcv-lite 2.1.0, a pure-Python wheel: no compiler, no CUDA toolkit. The compiled
#                   ops detectors need (RoIAlign, NMS, ...) come from mmdet_lrpq.ops (torchvision), on
#                   CPU and CUDA alike, through the mmcv._ext import hook that this script installs.
#   compiled        mmcv 2.1.0 built from its sdist with its C++ ops (15-20 minutes on 2 cores, hours
#                   for CUDA), after patching its hard-coded -std=c++17 (torch >= 2.10 headers need
#                   C++20); the wheel is cached outside the repository and reused by later installs.
#                   CUDA ops are built when tools/cuda_build_plan.py finds a usable CUDA toolchain (an
#                   nvcc of torch's CUDA version, and a visible GPU or MMDET_LRPQ_CUDA=1); CPU and CUDA
#                   wheels are cached in different folders (torch-<version>/, torch-<version>-cu<XY>-sm<archs>/).
#
# The environment only counts as installed once the final import check passed and the stamp
# file is written: any failure removes the stamp, so `make test` / `make demo` re-run the install
# instead of using a half-built environment. The stamp covers the recipe, the requirements and
# the mmcv decision, so switching MMDET_LRPQ_MMCV (or, for compiled ops, gaining a GPU) re-runs it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"
MMCV_VERSION="2.1.0"
WHEEL_ROOT="${MMDET_LRPQ_WHEEL_CACHE:-$HOME/.cache/mmdet-lrpq/wheels}"
STAMP="$VENV/.mmdet-lrpq-installed"
REQS="$ROOT/requirements/runtime.txt"
DEV_REQS="$ROOT/requirements/dev.txt"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
PLANNER="$ROOT/tools/cuda_build_plan.py"
MMCV_KIND="${MMDET_LRPQ_MMCV:-lite}"
case "$MMCV_KIND" in lite|compiled) ;; *) echo "[install] FAILED: MMDET_LRPQ_MMCV=$MMCV_KIND: use lite (default: mmcv-lite + torchvision ops) or compiled (build mmcv's C++ ops)" >&2; exit 1;; esac

# KEEP_STAMP=1 while nothing has been changed yet: a refused request (MMDET_LRPQ_CUDA=1 that
# cannot be met) leaves an installed environment installed.
KEEP_STAMP=0
say() { printf '\033[1m[install]\033[0m %s\n' "$*"; }
die() {
    printf '\033[1;31m[install] FAILED:\033[0m %s\n' "$*" >&2
    [ "$KEEP_STAMP" = 1 ] || rm -f "$STAMP"
    exit 1
}
trap 'rc=$?; [ $rc -eq 0 ] || [ "$KEEP_STAMP" = 1 ] || { rm -f "$STAMP"; printf "[install] stopped (exit %s); the environment is marked not installed.\n" "$rc" >&2; }' EXIT

# The ops decision (tools/cuda_build_plan.py, run by the venv's Python: it reads that torch).
# Sets PLAN_<key> for each key=value line it prints; its error (MMDET_LRPQ_CUDA=1 that cannot be
# met) stops the install.
plan_ops() {
    local out err line
    if [ "$MMCV_KIND" = lite ]; then
        PLAN_ops=torchvision; PLAN_cache_key=lite; PLAN_reason="mmcv-lite; RoIAlign/NMS/... from torchvision via mmdet_lrpq.ops"
        return
    fi
    err=$(mktemp)
    if ! out=$("$VENV/bin/python" "$PLANNER" 2>"$err"); then
        line=$(grep '^error: ' "$err" || cat "$err"); rm -f "$err"
        die "${line#error: }"
    fi
    rm -f "$err"
    while IFS= read -r line; do
        if [[ "$line" =~ ^([a-z_]+)=(.*)$ ]]; then printf -v "PLAN_${BASH_REMATCH[1]}" '%s' "${BASH_REMATCH[2]}"; fi
    done <<<"$out"
    [ -n "${PLAN_ops:-}" ] && [ -n "${PLAN_cache_key:-}" ] || die "tools/cuda_build_plan.py printed no decision: $out"
    if [ "$PLAN_ops" = cuda ]; then
        WHEEL_CACHE="$WHEEL_ROOT/torch-$TORCH_VERSION-$PLAN_cache_key"
    else
        WHEEL_CACHE="$WHEEL_ROOT/torch-$TORCH_VERSION"
    fi
    BUILD_LOG="$WHEEL_CACHE/mmcv-build.log"
}

fingerprint() {
    # What the stamp certifies: the install recipe, the pinned requirements and the ops decision.
    { cat "$ROOT/tools/install.sh" "$PLANNER" "$REQS" "$DEV_REQS" "$CONSTRAINTS" "$ROOT/setup.py" "$ROOT/_mmdet_lrpq_mmcv.py"; echo "mmcv-ops=$PLAN_cache_key"; } \
        | sha256sum | cut -d' ' -f1
}

if [ -f "$STAMP" ] && [ -x "$VENV/bin/python" ]; then
    KEEP_STAMP=1
    plan_ops
    KEEP_STAMP=0
    if [ "$(cat "$STAMP")" = "$(fingerprint)" ] && "$VENV/bin/python" -c "import mmdet_lrpq" 2>/dev/null; then
        say "environment up to date ($VENV, mmcv ops: $PLAN_ops)"
        exit 0
    fi
fi

# ---------------------------------------------------------------- preflight
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found. Install Python 3.11 or run: make install PYTHON=/path/to/python3.11"
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); the verified stack (torch $TORCH_VERSION, mmcv $MMCV_VERSION) needs Python 3.11"
free_gb=$(df -Pk "$ROOT" | awk 'NR==2 {print int($4/1024/1024)}')
[ "$free_gb" -ge 8 ] || die "only ${free_gb} GB free on $(df -P "$ROOT" | awk 'NR==2 {print $6}'); the environment needs about 8 GB (torch alone is ~5.5 GB), 12 GB while a compiled mmcv is built"

# ---------------------------------------------------------------- venv + torch
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV" || die "could not create a virtual environment with $PYTHON (Debian: apt install python3.11-venv)"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
PIP_INSTALL=("${PIP[@]}" install -q -c "$CONSTRAINTS")
say "installing build tools and torch $TORCH_VERSION / torchvision $TORCHVISION_VERSION"
"${PIP_INSTALL[@]}" --upgrade "pip>=24" || die "pip could not upgrade itself in $VENV"
"${PIP_INSTALL[@]}" setuptools wheel ninja || die "pip could not install setuptools/wheel/ninja"
"${PIP_INSTALL[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
    || die "pip could not install torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION from the package index"
"$VENV/bin/python" -c "import pkg_resources" 2>/dev/null \
    || die "setuptools in $VENV has no pkg_resources (needs setuptools<81, see requirements/constraints.txt)"

# ---------------------------------------------------------------- mmcv: lite (default) or compiled
plan_ops
say "mmcv ops: $PLAN_ops ($PLAN_reason)"
if [ "$MMCV_KIND" = lite ]; then
    # A compiled mmcv left from an earlier install owns the same package folder: replace it.
    "${PIP[@]}" uninstall -q -y mmcv >/dev/null 2>&1 || true
    "${PIP_INSTALL[@]}" "mmcv-lite==$MMCV_VERSION" || die "could not install mmcv-lite==$MMCV_VERSION from the package index"
else
    mkdir -p "$WHEEL_CACHE"
    have_mmcv_wheel() { ls "$WHEEL_CACHE"/mmcv-"$MMCV_VERSION"-*.whl >/dev/null 2>&1; }
    if ! have_mmcv_wheel; then
        [ "$free_gb" -ge 12 ] || die "only ${free_gb} GB free; building mmcv needs about 12 GB"
        command -v g++ >/dev/null 2>&1 || die "no C++ compiler: mmcv's ops must be compiled (Debian: apt install g++)"
        if [ "$PLAN_ops" = cuda ]; then
            # mmcv's setup.py builds CUDA ops when FORCE_CUDA=1; CUDA_HOME pins the toolkit the plan
            # checked (torch would otherwise guess it from PATH on its own).
            build_env=(MMCV_WITH_OPS=1 FORCE_CUDA=1 CUDA_HOME="$PLAN_cuda_home" TORCH_CUDA_ARCH_LIST="$PLAN_arch_list")
            say "building mmcv $MMCV_VERSION with CUDA $PLAN_torch_cuda ops for $PLAN_arch_list from the sdist (once per machine and architecture list; much longer than the CPU build: see docs/install.md)"
        else
            # mmcv's setup.py also builds CUDA ops whenever torch sees a GPU: hide it for a CPU build.
            build_env=(MMCV_WITH_OPS=1 FORCE_CUDA=0 CUDA_VISIBLE_DEVICES=)
            say "building mmcv $MMCV_VERSION with CPU ops from the sdist (about 15 minutes on 2 cores, once per machine)"
        fi
        say "build log: $BUILD_LOG"
        src=$(mktemp -d)
        "${PIP[@]}" download -q "mmcv==$MMCV_VERSION" --no-binary :all: --no-deps --no-build-isolation -d "$src" \
            || die "could not download the mmcv==$MMCV_VERSION sdist from the package index"
        tar xzf "$src/mmcv-$MMCV_VERSION.tar.gz" -C "$src" || die "mmcv sdist is unreadable"
        # torch >= 2.10 headers use C++20 features; mmcv's setup.py pins -std=c++14/17 (also for nvcc).
        sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g' "$src/mmcv-$MMCV_VERSION/setup.py"
        grep -q -- '-std=c++20' "$src/mmcv-$MMCV_VERSION/setup.py" || die "mmcv setup.py no longer has the -std flag this script patches"
        if ! (cd "$src/mmcv-$MMCV_VERSION" && env "${build_env[@]}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
                "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$src/wheel" . >"$BUILD_LOG" 2>&1); then
            echo "----- last errors of the mmcv build ($BUILD_LOG) -----" >&2
            grep -E -i "error|fatal|No space" "$BUILD_LOG" | tail -n 15 >&2 || tail -n 30 "$BUILD_LOG" >&2
            die "mmcv $MMCV_VERSION build ($PLAN_ops ops) failed (full log: $BUILD_LOG)"
        fi
        mv "$src/wheel"/mmcv-"$MMCV_VERSION"-*.whl "$WHEEL_CACHE/" || die "mmcv build produced no wheel"
        rm -rf "$src"
        say "cached the mmcv wheel ($PLAN_ops ops) in $WHEEL_CACHE"
    else
        say "reusing the cached mmcv wheel ($PLAN_ops ops) from $WHEEL_CACHE"
    fi
    MMCV_WHEEL=$(ls "$WHEEL_CACHE"/mmcv-"$MMCV_VERSION"-*.whl | head -n 1)
    # mmcv-lite owns the same package folder: remove it first (removing it later would delete mmcv's files).
    "${PIP[@]}" uninstall -q -y mmcv-lite >/dev/null 2>&1 || true
    "${PIP_INSTALL[@]}" "$MMCV_WHEEL" || die "could not install the mmcv wheel"
    # The CPU and CUDA wheels have the same name and version: make sure the chosen one is installed.
    "${PIP_INSTALL[@]}" --no-deps --force-reinstall "$MMCV_WHEEL" || die "could not install the mmcv wheel"
fi

# ---------------------------------------------------------------- the rest + the package
say "installing mmengine / mmdet / timm / pycocotools and mmdet-lrpq (editable)"
# mmdet is installed without dependency resolution so pip never tries to rebuild mmcv from source;
# its own runtime requirements are pinned in requirements/runtime.txt.
"${PIP_INSTALL[@]}" --no-deps "mmdet==3.3.0" || die "could not install mmdet==3.3.0"
"${PIP_INSTALL[@]}" -r "$REQS" || die "could not install requirements/runtime.txt"
"${PIP_INSTALL[@]}" -r "$DEV_REQS" || die "could not install requirements/dev.txt (ruff, mypy: the gates of make test)"
"${PIP_INSTALL[@]}" --no-build-isolation -e "$ROOT[tests]" || die "could not install mmdet-lrpq in editable mode"
# The mmcv._ext import hook at interpreter start, so that any import order works (_mmdet_lrpq_mmcv.py says why).
"$VENV/bin/python" -m _mmdet_lrpq_mmcv --install >/dev/null || die "could not write the mmcv._ext import hook (.pth) into $VENV"

# ---------------------------------------------------------------- prove it
say "checking the environment"
EXPECT_OPS="$PLAN_ops" "$VENV/bin/python" - <<'EOF' || die "the installed environment does not import (see the traceback above)"
import os
import torch, torchvision, mmengine, mmcv, mmdet, timm
from mmcv.ops import RoIAlign, get_compiling_cuda_version, nms  # before mmdet_lrpq: the .pth hook must serve it
import mmdet_lrpq
from mmdet_lrpq.env import check_openmmlab_stack
from mmdet_lrpq.ops import backend
check_openmmlab_stack()
boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.]])
_, keep = nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
assert keep.tolist() == [0], keep
expect, active = os.environ['EXPECT_OPS'], backend()['backend']
assert active == ('torchvision' if expect == 'torchvision' else 'compiled'), (expect, backend())
ops_cuda = get_compiling_cuda_version()
if expect == 'torchvision':
    ops = 'torchvision backend for mmcv ops ok'
elif expect == 'cuda':
    assert ops_cuda == torch.version.cuda, f'mmcv ops were built with CUDA {ops_cuda!r}, torch has {torch.version.cuda}'
    if torch.cuda.is_available():
        _, keep = nms(boxes.cuda(), torch.tensor([0.9, 0.8]).cuda(), 0.5)
        assert keep.tolist() == [0], keep
    ops = f'CUDA {ops_cuda} ops ok' + ('' if torch.cuda.is_available() else ', no GPU to run them here')
else:
    assert ops_cuda == 'not available', f'expected CPU-only mmcv ops, got CUDA {ops_cuda}'
    ops = 'compiled CPU ops ok'
print(f"  torch {torch.__version__}  torchvision {torchvision.__version__}  mmengine {mmengine.__version__}  "
      f"mmcv {mmcv.__version__} ({ops})  mmdet {mmdet.__version__}  timm {timm.__version__}  mmdet_lrpq {mmdet_lrpq.__version__}")
EOF
say "building the fused CPU quantization kernels (mmdet_lrpq/quant/csrc, once per machine, ~1 min)"
# A CPU fast path only: without a C++ compiler the library runs the same arithmetic in PyTorch.
"$VENV/bin/python" - <<'EOF' || say "WARNING: the fused CPU kernels did not build (no C++ compiler?); quantized CPU forwards use the PyTorch path. Retry: $VENV/bin/python -c 'from mmdet_lrpq.quant._ext import kernels; kernels(verbose=True)'"
from mmdet_lrpq.quant._ext import build_dir, kernels
assert kernels() is not None, 'build failed (the warning above says why)'
print(f"  fused kernels in {build_dir()}")
EOF
fingerprint >"$STAMP"
say "done: $VENV (mmcv ops: $PLAN_ops)"
