"""Run a job's real entry point as a user does: `python jobs/<job>.py ...` from the repo, with the
CPU DeepSpeed accelerator, offline wandb and a locally started Ray (no RAY_ADDRESS inherited)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_entry(job: str, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    e = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", **(env or {})}
    e.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, f"jobs/{job}.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=e)
