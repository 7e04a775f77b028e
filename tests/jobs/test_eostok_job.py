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


def _stop_own_head(proc: subprocess.Popen, temp: str) -> None:
    """Stop only the head this test started: `ray start --block` tears down what it started on
    SIGTERM; then anything left whose command line names our private temp dir (never other Ray
    processes on the machine: no `ray stop`, which stops every Ray cluster here)."""
    import signal

    import psutil

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    ours = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp in part for part in (p.info["cmdline"] or [])):
                ours.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in ours:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(ours, timeout=30)


@pytest.fixture
def ray_head():
    import shutil
    import tempfile
    import time
    import urllib.request

    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    gcs, dash = _free_port(), _free_port()
    # a throw-away local head: no token auth (Ray 2.6x enables it for `ray start` clusters)
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the entrypoint's `python` is this venv's
    start = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp}",
             "--disable-usage-stats"]
    log = open(os.path.join(temp, "ray_start.log"), "w")
    proc = subprocess.Popen(start, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, open(os.path.join(temp, "ray_start.log")).read()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "the local Ray head did not come up within 180 s"
                time.sleep(1)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop_own_head(proc, temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _submit(address: str, env: dict, args: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit`; again while the head answers that its node's job agent is not up yet (it
    comes up after the dashboard: seen on a loaded 2-core machine), for up to 2 minutes."""
    import time

    cmd = [str(BIN / "ray"), "job", "submit", f"--address={address}", "--working-dir", ".", "--",
           "python", "jobs/eostok_h.py", "--config", "configs/experiments/eostok_tiny.yaml", *args]
    deadline = time.time() + 120
    while True:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in r.stderr or time.time() > deadline:
            return r
        time.sleep(2)


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


def test_stopping_our_head_spares_other_ray_processes(tmp_path):
    """The fixture's clean-up kills only processes of its own head (a stand-in named like a raylet
    of another cluster survives; a process naming our temp dir does not)."""
    code = "import time; time.sleep(120)"
    other = subprocess.Popen([sys.executable, "-c", code, "raylet", "--temp-dir=/tmp/someone-else"])
    ours = subprocess.Popen([sys.executable, "-c", code, "raylet", f"--temp-dir={tmp_path}"], start_new_session=True)
    try:
        _stop_own_head(ours, str(tmp_path))
        assert ours.poll() is not None and other.poll() is None
    finally:
        other.kill()
        ours.kill()
