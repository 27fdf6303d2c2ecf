#!/usr/bin/env bash
# Create .venv and install lutq with its test extras. Idempotent and quick when nothing changed.
# Keeps an existing torch (e.g. a CUDA build on a GPU box); installs the CPU build torch==2.13.0 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-test}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[bootstrap] torch found in $PY ($("$PY" -c 'import torch; print(torch.__version__)')): reusing it"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[bootstrap] installing torch==2.13.0 (CPU build)"
  "$VENV/bin/python" -m pip install -q torch==2.13.0
fi
stamp="$VENV/.lutq-installed-$EXTRAS"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[bootstrap] installing lutq[$EXTRAS]"
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]" 2> >(grep -v "^WARNING: Location" >&2)
  touch "$stamp"
fi
