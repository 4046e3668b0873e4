#!/usr/bin/env bash
# The wheels a bare GPU machine lacks for mnc_d2 (it has Python, torch, torchvision, numpy, opencv,
# matplotlib, tqdm, tensorboard): the patched Detectron2 (pure Python), its pure-Python dependencies and
# the compiled ones for the target Python (manylinux x86_64). Runs on a CPU machine with this repo's venv.
#
#   bash scripts/gpu_bundle.sh [OUT]            # OUT default .gpu_bundle/ (git-ignored), for CPython 3.12
#   GPU_PYTHON=this bash scripts/gpu_bundle.sh  # for the running interpreter (benchmarks/gpu_check.sh --cpu-smoke)
#
# Install there: pip install --no-index --no-deps --target DIR OUT/*.whl (benchmarks/gpu_check.sh does).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$REPO/scripts/python_env.sh"
OUT=$(mkdir -p "${1:-$REPO/.gpu_bundle}" && cd "${1:-$REPO/.gpu_bundle}" && pwd)
GPU_PYTHON=${GPU_PYTHON:-3.12}
[ "$GPU_PYTHON" = this ] && GPU_PYTHON=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PIP=("$PY" -m pip --disable-pip-version-check -q)
PURE=(fvcore iopath yacs omegaconf hydra-core antlr4-python3-runtime termcolor tabulate portalocker cloudpickle
      pytest pluggy iniconfig pytest-timeout)   # pytest: the GPU tests run there too
# the versions this venv runs (tested together), and omegaconf's own pin of its parser runtime
PINS=$(mktemp); "$PY" -m pip freeze --disable-pip-version-check 2>/dev/null | grep -v '^-e ' > "$PINS"
echo "antlr4-python3-runtime==4.9.3" >> "$PINS"
COMPILED=(pycocotools pyyaml)
T0=$SECONDS; log() { echo "[gpu_bundle +$((SECONDS - T0))s] $*"; }

rm -f "$OUT"/*.whl
log "1/3 Detectron2: patched pb1-detectron2 0.6 -> a pure-Python wheel"
SRC=$(bash "$REPO/scripts/prepare_detectron2_sdist.sh" "$PY" "${D2_BUILD_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mnc_d2/d2build}" | tail -1)
(cd "$SRC" && "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$OUT" .)
log "2/3 pure-Python dependencies: ${PURE[*]}"
"${PIP[@]}" wheel --no-deps -c "$PINS" -w "$OUT" "${PURE[@]}"
log "3/3 compiled dependencies for CPython $GPU_PYTHON manylinux x86_64: ${COMPILED[*]}"
"${PIP[@]}" download --no-deps --only-binary=:all: -c "$PINS" --implementation cp \
  --python-version "$GPU_PYTHON" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 -d "$OUT" "${COMPILED[@]}"

# Complete for the target: every package resolves from OUT alone, as wheels for that Python.
for package in pb1-detectron2 "${PURE[@]}" "${COMPILED[@]}"; do
  "${PIP[@]}" download --no-index --find-links "$OUT" --no-deps --only-binary=:all: --implementation cp \
    --python-version "$GPU_PYTHON" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$(mktemp -d)" "$package" \
    || { echo "gpu_bundle: no wheel for $package (CPython $GPU_PYTHON) in $OUT" >&2; exit 1; }
done
SIZE_KB=$(du -sk "$OUT" | cut -f1)
[ "$SIZE_KB" -lt $((48 * 1024)) ] || { echo "gpu_bundle: $OUT is ${SIZE_KB} KiB, over 48 MiB" >&2; exit 1; }
ls "$OUT" > "$OUT/MANIFEST.txt"
log "done: $(ls "$OUT"/*.whl | wc -l) wheels, ${SIZE_KB} KiB in $OUT (CPython $GPU_PYTHON)"
