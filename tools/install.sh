#!/usr/bin/env bash
# One-command set-up for mmdet-lrpq (called by `make install`).
#
# Creates .venv/ at the repository root with the verified stack of DESIGN §5 and the package in
# editable mode. mmcv 2.1.0 has no wheel for this torch, so its sdist is built once with the CPU
# ops (RoIAlign, NMS, ...) after patching its hard-coded -std=c++17 (torch >= 2.10 headers need
# C++20); the wheel is cached outside the repository and reused by every later install.
#
# The environment only counts as installed once the final import check passed and the stamp
# file is written: any failure removes the stamp, so `make test` / `make demo` re-run the install
# instead of using a half-built environment.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"
MMCV_VERSION="2.1.0"
WHEEL_CACHE="${MMDET_LRPQ_WHEEL_CACHE:-$HOME/.cache/mmdet-lrpq/wheels}/torch-$TORCH_VERSION"
STAMP="$VENV/.mmdet-lrpq-installed"
REQS="$ROOT/requirements/runtime.txt"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
BUILD_LOG="$WHEEL_CACHE/mmcv-build.log"

say() { printf '\033[1m[install]\033[0m %s\n' "$*"; }
die() {
    printf '\033[1;31m[install] FAILED:\033[0m %s\n' "$*" >&2
    rm -f "$STAMP"
    exit 1
}
trap 'rc=$?; [ $rc -eq 0 ] || { rm -f "$STAMP"; printf "[install] stopped (exit %s); the environment is marked not installed.\n" "$rc" >&2; }' EXIT

fingerprint() {
    # What the stamp certifies: the install recipe and the pinned requirements.
    cat "$ROOT/tools/install.sh" "$REQS" "$CONSTRAINTS" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(fingerprint)" ] && "$VENV/bin/python" -c "import mmdet_lrpq" 2>/dev/null; then
    say "environment up to date ($VENV)"
    exit 0
fi

# ---------------------------------------------------------------- preflight
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found. Install Python 3.11 or run: make install PYTHON=/path/to/python3.11"
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); the verified stack (torch $TORCH_VERSION, mmcv $MMCV_VERSION) needs Python 3.11"
mkdir -p "$WHEEL_CACHE"
have_mmcv_wheel() { ls "$WHEEL_CACHE"/mmcv-"$MMCV_VERSION"-*.whl >/dev/null 2>&1; }
need_gb=12
have_mmcv_wheel && need_gb=8
free_gb=$(df -Pk "$ROOT" | awk 'NR==2 {print int($4/1024/1024)}')
[ "$free_gb" -ge "$need_gb" ] || die "only ${free_gb} GB free on $(df -P "$ROOT" | awk 'NR==2 {print $6}'); the environment needs about ${need_gb} GB (torch alone is ~5.5 GB)"

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

# ---------------------------------------------------------------- mmcv with ops
if ! have_mmcv_wheel; then
    command -v g++ >/dev/null 2>&1 || die "no C++ compiler: mmcv's ops must be compiled (Debian: apt install g++)"
    say "building mmcv $MMCV_VERSION with CPU ops from the sdist (about 15 minutes on 2 cores, once per machine)"
    say "build log: $BUILD_LOG"
    src=$(mktemp -d)
    "${PIP[@]}" download -q "mmcv==$MMCV_VERSION" --no-binary :all: --no-deps --no-build-isolation -d "$src" \
        || die "could not download the mmcv==$MMCV_VERSION sdist from the package index"
    tar xzf "$src/mmcv-$MMCV_VERSION.tar.gz" -C "$src" || die "mmcv sdist is unreadable"
    # torch >= 2.10 headers use C++20 features; mmcv's setup.py pins -std=c++14/17.
    sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g' "$src/mmcv-$MMCV_VERSION/setup.py"
    grep -q -- '-std=c++20' "$src/mmcv-$MMCV_VERSION/setup.py" || die "mmcv setup.py no longer has the -std flag this script patches"
    if ! (cd "$src/mmcv-$MMCV_VERSION" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
            "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$src/wheel" . >"$BUILD_LOG" 2>&1); then
        echo "----- last errors of the mmcv build ($BUILD_LOG) -----" >&2
        grep -E -i "error|fatal|No space" "$BUILD_LOG" | tail -n 15 >&2 || tail -n 30 "$BUILD_LOG" >&2
        die "mmcv $MMCV_VERSION build failed (full log: $BUILD_LOG)"
    fi
    mv "$src/wheel"/mmcv-"$MMCV_VERSION"-*.whl "$WHEEL_CACHE/" || die "mmcv build produced no wheel"
    rm -rf "$src"
else
    say "reusing cached mmcv wheel from $WHEEL_CACHE"
fi
"${PIP_INSTALL[@]}" "$WHEEL_CACHE"/mmcv-"$MMCV_VERSION"-*.whl || die "could not install the mmcv wheel"

# ---------------------------------------------------------------- the rest + the package
say "installing mmengine / mmdet / timm / pycocotools and mmdet-lrpq (editable)"
# mmdet is installed without dependency resolution so pip never tries to rebuild mmcv from source;
# its own runtime requirements are pinned in requirements/runtime.txt.
"${PIP_INSTALL[@]}" --no-deps "mmdet==3.3.0" || die "could not install mmdet==3.3.0"
"${PIP_INSTALL[@]}" -r "$REQS" || die "could not install requirements/runtime.txt"
"${PIP_INSTALL[@]}" --no-build-isolation -e "$ROOT[tests]" || die "could not install mmdet-lrpq in editable mode"

# ---------------------------------------------------------------- prove it
say "checking the environment"
"$VENV/bin/python" - <<'EOF' || die "the installed environment does not import (see the traceback above)"
import torch, torchvision, mmengine, mmcv, mmdet, timm
from mmcv.ops import RoIAlign, nms
import mmdet_lrpq
boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.]])
_, keep = nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
assert keep.tolist() == [0], keep
print(f"  torch {torch.__version__}  torchvision {torchvision.__version__}  mmengine {mmengine.__version__}  "
      f"mmcv {mmcv.__version__} (ops ok)  mmdet {mmdet.__version__}  timm {timm.__version__}  mmdet_lrpq {mmdet_lrpq.__version__}")
EOF
say "building the fused CPU quantization kernels (mmdet_lrpq/quant/csrc, once per machine, ~1 min)"
"$VENV/bin/python" - <<'EOF' || die "the fused CPU kernels did not build; rerun with: $VENV/bin/python -c 'from mmdet_lrpq.quant._ext import kernels; kernels(verbose=True)' (needs the C++ toolchain that built mmcv)"
from mmdet_lrpq.quant._ext import build_dir, kernels
assert kernels() is not None, 'build failed (the warning above says why)'
print(f"  fused kernels in {build_dir()}")
EOF
fingerprint >"$STAMP"
say "done: $VENV"
