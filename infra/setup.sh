#!/usr/bin/env bash
# Create the project's virtual environment and install the package with its test extras, at the
# tested versions of infra/constraints.txt (`pip install -c`; the GPU image uses the same file).
# A CPU machine gets torch's CPU build first (PyTorch's CPU index, else the default index), so no
# CUDA wheels are downloaded; a GPU machine without torch gets the default (CUDA) build of the
# pinned version. A torch already installed at another version is kept (with a warning) and only
# the other pins apply; so does TORCH_SPEC="torch==X" (install that instead).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="${CONSTRAINTS:-infra/constraints.txt}"
[ -f "$CONSTRAINTS" ] || { echo "[setup] constraints file $CONSTRAINTS not found" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv ${VENV_ARGS:-} "$VENV"
fi
PY="$VENV/bin/python"
TORCH_PIN="$(grep -E '^torch==' "$CONSTRAINTS" | head -n1 | cut -d= -f3 || true)"
[ -n "$TORCH_PIN" ] || { echo "[setup] $CONSTRAINTS pins no torch" >&2; exit 1; }
# the constraints without torch: used when the torch of this environment is not the pinned one
OTHER_PINS="$(mktemp)"
trap 'rm -f "$OTHER_PINS"' EXIT
grep -v -E '^torch==' "$CONSTRAINTS" > "$OTHER_PINS"
PINS="$CONSTRAINTS"

if ! "$PY" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    echo "[setup] installing $TORCH_SPEC (TORCH_SPEC; torch's pin $TORCH_PIN is not applied)"
    PINS="$OTHER_PINS"
    "$PY" -m pip install -q -c "$PINS" "$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] GPU found: installing the default (CUDA) build of torch==$TORCH_PIN"
    "$PY" -m pip install -q -c "$PINS" "torch==$TORCH_PIN"
  else
    # no GPU: PyTorch's CPU wheel index (no CUDA packages); fall back to the default index
    echo "[setup] no GPU: installing torch==$TORCH_PIN (CPU build)"
    "$PY" -m pip install -q -c "$PINS" --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" "torch==$TORCH_PIN" 2>/dev/null \
      || "$PY" -m pip install -q -c "$PINS" "torch==$TORCH_PIN"
  fi
else
  HAVE="$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")"
  if [ "$HAVE" != "$TORCH_PIN" ]; then
    echo "[setup] keeping the installed torch $HAVE (the tested one is $TORCH_PIN); the other pins still apply"
    PINS="$OTHER_PINS"
  fi
fi
echo "[setup] installing the project (editable) with dev extras, pinned by $CONSTRAINTS"
PIP_LOG="$(mktemp)"
trap 'rm -f "$OTHER_PINS" "$PIP_LOG"' EXIT
if ! "$PY" -m pip install -q -c "$PINS" -e ".[dev]" >"$PIP_LOG" 2>&1; then
  grep -v "is ignored: it is neither" "$PIP_LOG" >&2 || true
  echo "[setup] pip could not install the project at the pinned versions of $PINS (see above)" >&2
  exit 1
fi
grep -v "is ignored: it is neither" "$PIP_LOG" || true
"$PY" -c "import torch, deepspeed, ray, system, cluster; print(f'[setup] ok: torch {torch.__version__} ({\"CUDA \" + torch.version.cuda if torch.version.cuda else \"CPU build\"}), deepspeed {deepspeed.__version__}, ray {ray.__version__}')"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # DeepSpeed compiles its CPU communication op on first use; build it now, so an interrupted first
  # run cannot leave a build lock behind (it would make later runs wait forever)
  echo "[setup] building DeepSpeed's CPU communication op (once)"
  DS_ACCELERATOR=cpu "$PY" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 \
    || echo "[setup] (could not prebuild it; the first run builds it instead)"
fi
