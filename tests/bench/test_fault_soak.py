"""The fault soak's short version (bench/fault_soak.py): three scenarios on the shrunk tiny EOSTok
preset (6 steps, a checkpoint every 2): a RayTrainWorker killed with SIGKILL, the driver killed and
the job resubmitted, a damaged file in the newest checkpoint. Each run ends bit-identical to the
uninterrupted reference (checkpoints, exports, metrics, every rank's samples at every step); the
damaged checkpoint is named in the log and lost by design (the steps after the one before it are
trained again). The full 20-scenario soak is run by hand (its table is in the closing note)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_short_fault_soak_ends_bit_identical(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/fault_soak.py"), "--scenarios", "3", "--seed", "1", "--steps", "6", "--every",
         "2", "--kinds", "kill_rank,kill_driver,ckpt_damage", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0 and "3 scenarios, 3 bit-identical" in out, out[-4000:] + proc.stderr[-4000:]
    report = json.loads(out[out.rindex("\n{") + 1:])
    assert sorted(r["kind"] for r in report["results"]) == ["ckpt_damage", "kill_driver", "kill_rank"]
    assert all(r["recovery_s"] is not None and r["recovery_s"] > 0 for r in report["results"])
    damaged = next(r for r in report["results"] if r["kind"] == "ckpt_damage")
    assert "lost by design" in damaged["note"] and damaged["detail"].startswith("step 4: ")
