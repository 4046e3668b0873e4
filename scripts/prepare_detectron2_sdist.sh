#!/usr/bin/env bash
# Downloads the pb1-detectron2==0.6 sdist (sha256-checked, cached) and unpacks + patches it into a fresh
# source folder, printed on the last line. Used by install.sh (install it) and gpu_bundle.sh (wheel it).
# usage: prepare_detectron2_sdist.sh PYTHON BUILD_DIR
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${1:?usage: prepare_detectron2_sdist.sh PYTHON BUILD_DIR}
D2_BUILD_DIR=${2:?usage: prepare_detectron2_sdist.sh PYTHON BUILD_DIR}
SDIST=$D2_BUILD_DIR/dl/pb1-detectron2-0.6.tar.gz
SDIST_SHA256=5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29
mkdir -p "$D2_BUILD_DIR/dl"
if ! echo "$SDIST_SHA256  $SDIST" | sha256sum -c --status 2>/dev/null; then
  rm -f "$SDIST"   # setup.py imports torch -> metadata prep needs --no-build-isolation
  "$PY" -m pip download -q --disable-pip-version-check pb1-detectron2==0.6 --no-deps \
    --no-binary :all: --no-build-isolation -d "$D2_BUILD_DIR/dl" >&2
  echo "$SDIST_SHA256  $SDIST" | sha256sum -c - >&2
fi
SRC=$D2_BUILD_DIR/src
rm -rf "$SRC"; mkdir -p "$SRC"; tar xzf "$SDIST" -C "$SRC" --strip-components=1 --no-same-owner
bash "$REPO/scripts/patch_detectron2_sdist.sh" "$SRC" >&2
echo "$SRC"
