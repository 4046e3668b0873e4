# Sourced by the scripts: sets PY to the interpreter install.sh installed into.
if [ "${MNC_USE_CURRENT_PYTHON:-0}" = 1 ]; then PY=$(command -v "${PYTHON:-python3}"); else PY=${VENV:-$REPO/.venv}/bin/python; fi
