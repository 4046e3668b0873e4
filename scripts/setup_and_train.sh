#!/usr/bin/env bash
# The main job (README command 1): install everything (skipped when present), then train MNC on the
# built-in synthetic dataset on CPU and evaluate it (COCO bbox + segm AP tables at the end).
# Extra arguments go to train_net.py, e.g. `bash scripts/setup_and_train.sh SOLVER.MAX_ITER 100`.
# Re-running resumes from the last checkpoint (a finished run is only re-evaluated).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$REPO/scripts/install.sh"
source "$REPO/scripts/python_env.sh"
cd "$REPO"
CONFIG=${CONFIG:-configs/mnc_R18_GN_FPN_shapes_cpu.yaml}
echo "[setup_and_train] training $CONFIG (output: see OUTPUT_DIR in the config)"
exec "$PY" -W ignore::FutureWarning -W ignore::UserWarning train_net.py --config-file "$CONFIG" --resume "$@"
