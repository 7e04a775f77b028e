"""Smoke run of bench/vapi_iteration.py (a few iterations of a tiny model), so the benchmark keeps
working as the pool changes. The figure itself is reported by the script, not asserted here."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_vapi_iteration_bench_prints_the_split():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/vapi_iteration.py"), "--iters", "4", "--layers", "1", "--dim", "32",
         "--batch", "2", "--group", "2", "--no-lpips"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    report = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert report["images_x_group"] == "2x2" and report["iteration_s"] > 0
    parts = ("rollout_s", "decode_reward_s", "update_s", "weight_sync_s")
    assert all(report[k] >= 0 for k in parts) and sum(report[k] for k in parts) <= report["iteration_s"] * 1.05
    assert "weight sync =" in out
