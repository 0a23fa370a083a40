#!/usr/bin/env bash
# Distributed test: tools/dist_test.sh CONFIG CHECKPOINT NPROC [tools/test.py options...]
# Uses torchrun; on a machine without CUDA the processes talk over gloo (tools/test.py sets it up).
set -euo pipefail
CONFIG=$1
CHECKPOINT=$2
NPROC=$3
PORT=${PORT:-29500}
DIR="$(cd "$(dirname "$0")" && pwd)"
PYTHON=${PYTHON:-python}
PYTHONPATH="$DIR/..${PYTHONPATH:+:$PYTHONPATH}" \
exec "$PYTHON" -m torch.distributed.run --nnodes=1 --nproc_per_node="$NPROC" --master_port="$PORT" \
    "$DIR/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "${@:4}"
