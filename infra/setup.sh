#!/usr/bin/env bash
# Create the project's virtual environment and install the package with its test extras.
# A GPU machine keeps the torch it has (or gets the default CUDA build); a CPU machine gets the
# CPU build first, so no CUDA wheels are downloaded. Override with TORCH_SPEC="torch==X".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv ${VENV_ARGS:-} "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then spec="$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1; then spec="torch"
  else spec="torch==2.13.0"; fi
  echo "[setup] installing $spec"
  "$PY" -m pip install -q "$spec"
fi
echo "[setup] installing the project (editable) with dev extras"
"$PY" -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
"$PY" -c "import torch, deepspeed, ray, system, cluster; print(f'[setup] ok: torch {torch.__version__}, deepspeed {deepspeed.__version__}, ray {ray.__version__}')"
