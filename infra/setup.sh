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
  if [ -n "${TORCH_SPEC:-}" ]; then
    echo "[setup] installing $TORCH_SPEC"
    "$PY" -m pip install -q "$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] GPU found: installing the default (CUDA) torch"
    "$PY" -m pip install -q torch
  else
    # no GPU: PyTorch's CPU wheel index (no CUDA packages); fall back to the default index
    echo "[setup] no GPU: installing torch==2.13.0 (CPU build)"
    "$PY" -m pip install -q --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" torch==2.13.0 2>/dev/null \
      || "$PY" -m pip install -q torch==2.13.0
  fi
fi
echo "[setup] installing the project (editable) with dev extras"
"$PY" -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
"$PY" -c "import torch, deepspeed, ray, system, cluster; print(f'[setup] ok: torch {torch.__version__} ({\"CUDA \" + torch.version.cuda if torch.version.cuda else \"CPU build\"}), deepspeed {deepspeed.__version__}, ray {ray.__version__}')"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # DeepSpeed compiles its CPU communication op on first use; build it now, so an interrupted first
  # run cannot leave a build lock behind (it would make later runs wait forever)
  echo "[setup] building DeepSpeed's CPU communication op (once)"
  DS_ACCELERATOR=cpu "$PY" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 \
    || echo "[setup] (could not prebuild it; the first run builds it instead)"
fi
