#!/usr/bin/env bash
# The test command (README, .ci/run): installs what is missing (seconds when present), runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k roi_heads`.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$REPO/scripts/install.sh"
source "$REPO/scripts/python_env.sh"
cd "$REPO"
exec "$PY" -m pytest "$REPO/tests" "$@"
