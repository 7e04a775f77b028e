#!/usr/bin/env bash
# Create the project's virtual environment and install the package with its test extras at the
# tested versions: `pip install -c` with the CPU lock infra/lock-cpu.txt (infra/lock.py; CI installs
# exactly it). A CPU machine gets torch's CPU build (the lock's torch==X+cpu: PyTorch's CPU index,
# else the default index), so no CUDA wheels are downloaded. A GPU machine gets PyPI's CUDA build of
# the same torch with the CUDA lock's pins for it (triton, nvidia-*, infra/lock-cuda.txt) and the
# CPU lock's for everything else. A torch already installed at another version is kept (with a
# warning) and only the other pins apply; so does TORCH_SPEC="torch==X" (install that instead).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
LOCK="${LOCK:-infra/lock-cpu.txt}"
CUDA_LOCK="${CUDA_LOCK:-infra/lock-cuda.txt}"
[ -f "$LOCK" ] || { echo "[setup] lock file $LOCK not found" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv ${VENV_ARGS:-} "$VENV"
fi
PY="$VENV/bin/python"
pins_of() { grep -E '^[A-Za-z0-9]' "$1" | sed 's/[[:space:]]*#.*//'; }  # NAME==VERSION lines
TORCH_LOCKED="$(pins_of "$LOCK" | grep -E '^torch==' | head -n1 | cut -d= -f3 || true)"  # e.g. 2.13.0+cpu
[ -n "$TORCH_LOCKED" ] || { echo "[setup] $LOCK pins no torch" >&2; exit 1; }
TORCH_PIN="${TORCH_LOCKED%%+*}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
# the pins without torch: used when the torch of this environment is not the locked one
pins_of "$LOCK" | grep -v -E '^torch==' > "$TMP/other.txt"
# a GPU machine: the CPU lock's pins, torch and what only the CUDA build needs from the CUDA lock
{ cat "$TMP/other.txt"
  awk -F'==' 'NR == FNR { cpu[$1] = 1; next } !($1 in cpu) || $1 == "torch"' "$TMP/other.txt" <(pins_of "$CUDA_LOCK")
} > "$TMP/gpu.txt"
PINS="$LOCK"

if ! "$PY" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    echo "[setup] installing $TORCH_SPEC (TORCH_SPEC; torch's pin $TORCH_PIN is not applied)"
    PINS="$TMP/other.txt"
    "$PY" -m pip install -q -c "$PINS" "$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] GPU found: installing PyPI's CUDA build of torch==$TORCH_PIN (pins: $LOCK, $CUDA_LOCK)"
    PINS="$TMP/gpu.txt"
    "$PY" -m pip install -q -c "$PINS" "torch==$TORCH_PIN"
  else
    # no GPU: PyTorch's CPU wheel index (no CUDA packages); fall back to the default index
    echo "[setup] no GPU: installing torch==$TORCH_LOCKED (CPU build)"
    "$PY" -m pip install -q -c "$PINS" --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" "torch==$TORCH_LOCKED" 2>/dev/null \
      || "$PY" -m pip install -q -c "$PINS" "torch==$TORCH_LOCKED"
  fi
else
  HAVE="$("$PY" -c "import torch; print(torch.__version__)")"
  if [ "$HAVE" = "$TORCH_PIN" ] && [ "$HAVE" != "$TORCH_LOCKED" ]; then
    PINS="$TMP/gpu.txt"  # PyPI's CUDA build of the locked version
  elif [ "$HAVE" != "$TORCH_LOCKED" ]; then
    echo "[setup] keeping the installed torch $HAVE (the tested one is $TORCH_LOCKED); the other pins still apply"
    PINS="$TMP/other.txt"
  fi
fi
echo "[setup] installing the project (editable) with dev extras, pinned by $LOCK"
PIP_LOG="$TMP/pip.log"
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
