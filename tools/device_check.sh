#!/usr/bin/env bash
# The GPU check for an air-gapped node (docs/install.md, "Checking a GPU node").
#
#   tools/device_check.sh --prepare              # here, with the package index: the wheels to carry
#   tools/device_check.sh [--device cuda|cpu] [--quick] [--steps ...] [--image JPG] [--json OUT]
#
# --prepare downloads the pure OpenMMLab wheels a node with Python 3.12, torch, torchvision and timm
# lacks (mmengine, mmdet, mmcv-lite, pycocotools, ...; no compiled mmcv: its ops come from
# torchvision) into wheels/device/ (git-ignored; under 60 MiB). On the node, the check installs them
# into .device_site/ with pip --no-index (nothing is fetched), puts the mmcv._ext import hook there,
# and runs tools/device_check.py, which prints one summary and writes JSON.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${MMDET_LRPQ_DEVICE_WHEELS:-$ROOT/wheels/device}"
SITE="$ROOT/.device_site"
MAX_MIB=60
# What the node's image lacks, pinned to the verified stack (requirements/runtime.txt).
CARRY=(mmengine==0.10.7 mmdet==3.3.0 mmcv-lite==2.1.0 pycocotools==2.0.11 shapely==2.2.0 terminaltables==3.1.10
       addict==2.4.0 yapf==0.43.0 platformdirs==4.5.1 termcolor==3.3.0)
TARGET_PY="${MMDET_LRPQ_DEVICE_PYTHON_VERSION:-3.12}"

if [ -x "$ROOT/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then PYTHON="$ROOT/.venv/bin/python"; fi
PYTHON="${PYTHON:-python3}"

if [ "${1:-}" = "--prepare" ]; then
    mkdir -p "$WHEELS"
    abi="cp${TARGET_PY/./}"
    for spec in "${CARRY[@]}"; do
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" \
            --implementation cp --abi "$abi" --abi abi3 --abi none \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d "$WHEELS" "$spec" \
            || { echo "[device_check] could not download $spec for CPython $TARGET_PY" >&2; exit 1; }
    done
    size_kib=$(du -sk "$WHEELS" | cut -f1)
    echo "[device_check] $(ls "$WHEELS"/*.whl | wc -l) wheels in $WHEELS: $((size_kib / 1024)) MiB"
    [ "$size_kib" -le $((MAX_MIB * 1024)) ] || { echo "[device_check] over the ${MAX_MIB} MiB budget" >&2; exit 1; }
    echo "[device_check] carry wheels/device to the node, then run tools/device_check.sh there"
    exit 0
fi

# The node: use the carried wheels only where the stack is missing.
if ! "$PYTHON" -c "import mmengine, mmdet, mmcv, pycocotools" >/dev/null 2>&1; then
    ls "$WHEELS"/*.whl >/dev/null 2>&1 \
        || { echo "[device_check] mmengine/mmdet/mmcv are not installed and $WHEELS has no wheels: run 'tools/device_check.sh --prepare' where the package index is reachable, and carry wheels/device here" >&2; exit 1; }
    if [ ! -f "$SITE/.installed" ]; then
        rm -rf "$SITE"
        "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl \
            || { echo "[device_check] could not install the carried wheels into $SITE" >&2; exit 1; }
        touch "$SITE/.installed"
    fi
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    # PYTHONPATH folders run no .pth files: sitecustomize installs the mmcv._ext import hook instead.
    printf 'import _mmdet_lrpq_mmcv\n_mmdet_lrpq_mmcv.install()\n' >"$SITE/sitecustomize.py"
    echo "[device_check] using the carried OpenMMLab wheels from $SITE"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" "$ROOT/tools/device_check.py" "$@"
