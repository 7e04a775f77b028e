"""jobs/eostok_h.py through `ray job submit` against a local head started here, then resubmitted
with the same run name: the second job continues from the stored step."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_config_error_exits_2_before_ray(tmp_path):
    r = subprocess.run([sys.executable, "jobs/eostok_h.py", "data.url=/x", "train.max_step=3"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "unknown config key 'train.max_step'" in r.stderr
    assert "Ray" not in r.stdout + r.stderr.replace("config error", "")


@pytest.fixture
def ray_head():
    import shutil
    import tempfile

    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    gcs, dash = _free_port(), _free_port()
    # a throw-away local head: no token auth (Ray 2.6x enables it for `ray start` clusters)
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the entrypoint's `python` is this venv's
    start = [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=4", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp}",
             "--disable-usage-stats"]
    r = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _submit(address: str, env: dict, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", f"--address={address}", "--working-dir", ".", "--",
           "python", "jobs/eostok_h.py", "--config", "configs/experiments/eostok_tiny.yaml", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_ray_job_submit_then_resubmit_continues(ray_head, tmp_path):
    address, env = ray_head
    runs, data = tmp_path / "runs", tmp_path / "data"
    common = [f"checkpoint.storage_path={runs}", f"data.url={data}/train", f"data.val_url={data}/val",
              "run_name=submitted", "checkpoint.every_steps=2", "logging.log_every=1", "train.sample_grid=4"]
    first = _submit(address, env, [*common, "train.max_steps=4"])
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert "succeeded" in first.stdout.lower()
    ckpts = sorted(p.name for p in (runs / "submitted" / "checkpoints").iterdir() if (p / "COMMITTED").exists())
    assert ckpts and ckpts[-1] == "step_00000004", ckpts
    assert (runs / "submitted" / "export" / "tokenizer.safetensors").exists()

    second = _submit(address, env, [*common, "train.max_steps=6"])
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "resumed from" in second.stdout and "(step 4)" in second.stdout
    ckpts = sorted(p.name for p in (runs / "submitted" / "checkpoints").iterdir() if (p / "COMMITTED").exists())
    assert ckpts[-1] == "step_00000006", ckpts
    lines = [json.loads(x) for x in (runs / "submitted" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [m["step"] for m in lines if "step" in m]
    assert max(steps) == 6
