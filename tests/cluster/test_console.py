"""The console and the run's logs: every line once (console and logs, verbose or not), Ray's worker
death reports in the driver log rather than on a quiet console, and the logs of a run on object
storage in `<run>/logs/` there (a local S3 endpoint), also after a worker was killed."""
from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEATH = "A worker died or was killed while executing a task by an unexpected system error."


@pytest.fixture
def driver_logging(monkeypatch):
    """setup_driver_logging changes process-wide state: the root logger, Ray's error printing and
    the registry of run logs. Put back afterwards."""
    import ray._private.worker as ray_worker

    import cluster.reporting as R

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    printer = ray_worker.print_to_stdstream
    monkeypatch.setattr(R, "_LOGS", [])
    monkeypatch.setattr(R, "_at_exit", [None])
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    ray_worker.print_to_stdstream = printer


def _ray_reports(line: str) -> None:
    """What Ray's driver does with an error the cluster pushes (listen_error_messages)."""
    import ray._private.worker as ray_worker

    ray_worker.print_to_stdstream({"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False)


def _progress(events):
    """A ConsoleProgress fed from the list `events` instead of the Ray board."""
    from cluster.console import ConsoleProgress

    class Progress(ConsoleProgress):
        def poll(self) -> None:
            pending, self.board = self.board, []
            for e in pending:
                self.handle(e)

    return Progress(list(events), "run", 4, enabled=False)


def test_a_refused_run_raises_the_ranks_config_error(driver_logging):
    """A rank's error that every restart would meet again (cluster/train_pool.py `refuse`) reaches the
    driver as a ConfigError with its one line: once the pool ended, or after a grace when the other
    ranks wait on for the refused one."""
    import threading
    import time

    from cluster.console import run_with_progress
    from system.config import ConfigError

    refused = {"kind": "refused", "rank": 1, "message": "config key 'data.url': unreadable"}
    with pytest.raises(ConfigError, match=r"^config key 'data.url': unreadable$"):
        run_with_progress(lambda: "finished", _progress([refused]), every_s=0.01)
    release = threading.Event()
    t = time.monotonic()
    with pytest.raises(ConfigError, match="unreadable"):
        run_with_progress(lambda: release.wait(60), _progress([refused]), every_s=0.01, refused_grace_s=0.5)
    assert time.monotonic() - t < 10
    release.set()
    assert run_with_progress(lambda: 7, _progress([{"kind": "step", "step": 1}]), every_s=0.01) == 7


def test_rays_error_listener_prints_through_the_function_we_route():
    import ray._private.worker as ray_worker

    assert "print_to_stdstream(" in inspect.getsource(ray_worker.listen_error_messages)


def test_quiet_driver_logs_to_object_storage_and_keeps_ray_errors_off_the_console(bucket, s3_server, capsys,
                                                                                driver_logging):
    from cluster.console import say, setup_driver_logging
    from cluster.reporting import sync_logs
    from system.config import StorageConfig

    fs, name = bucket
    where = setup_driver_logging(f"s3://{name}/run", verbose=False, storage=StorageConfig(endpoint_url=s3_server))
    assert where == f"s3://{name}/run/logs/driver.log"
    logging.getLogger("some.library").info("an INFO line of a library")
    say("[run] a console line")
    _ray_reports(f"{DEATH} Worker PID: 123")
    out = capsys.readouterr()
    assert out.out == "" and out.err == "[run] a console line\n"  # no Ray report, each line once
    assert sync_logs(final=True)
    text = fs.cat(f"{name}/run/logs/driver.log").decode()
    for line in ("INFO some.library: an INFO line of a library", "INFO tokenizer_ar: [run] a console line",
                 f"WARNING ray.errors: {DEATH} Worker PID: 123"):
        assert text.count(line) == 1, (line, text)


def test_verbose_driver_prints_every_line_once(tmp_path, capsys, driver_logging):
    from cluster.console import ConsoleProgress, say, setup_driver_logging

    path = setup_driver_logging(str(tmp_path / "run"), verbose=True)
    assert path == str(tmp_path / "run" / "logs" / "driver.log")
    say("[run] a console line")
    ConsoleProgress(None, "run", 4, enabled=False).handle({"kind": "checkpoint", "step": 2, "url": "u"})
    logging.getLogger("some.library").info("an INFO line of a library")
    _ray_reports(DEATH)  # verbose: Ray prints its reports as it always did
    out = capsys.readouterr()
    for line in ("[run] a console line", "[run] checkpoint step 2: u", "an INFO line of a library"):
        assert out.err.count(line) == 1, (line, out.err)
    assert out.out.count(DEATH) == 1
    text = Path(path).read_text()
    assert text.count("[run] a console line") == 1 and text.count("[run] checkpoint step 2: u") == 1


WORKER = textwrap.dedent("""
    import logging, os, sys
    import cluster.console
    from cluster.console import worker_output
    from system.config import StorageConfig
    from ray.train.v2._internal.logging.patch_print import patch_print_function

    # a Ray Train worker: print patched to log through the root logger (stderr), sys.stdout wrapped
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    sys.stdout = open(1, "w", closefd=False)
    patch_print_function()
    if sys.argv[2] == "keep-patch":
        cluster.console.unpatch_print = lambda: None
    with worker_output(sys.argv[1], 0, StorageConfig(endpoint_url=os.environ["ENDPOINT"])):
        print("a printed line")
        logging.getLogger("lib").warning("a logged line")
        os.write(1, b"a C-level line\\n")
        raise RuntimeError("the rank failed")
""")


def _worker(url: str, endpoint: str, mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ENDPOINT": endpoint}
    return subprocess.run([sys.executable, "-c", WORKER, url, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_worker_output_reaches_the_rank_log_once_with_the_error(bucket, s3_server):
    fs, name = bucket
    proc = _worker(f"s3://{name}/run", s3_server, "fixed")
    assert proc.returncode == 1 and "the rank failed" not in proc.stdout + proc.stderr  # all in the log
    text = fs.cat(f"{name}/run/logs/rank_0.log").decode()
    for line in ("a printed line", "a logged line", "a C-level line", "RuntimeError: the rank failed"):
        assert text.count(line) == 1, (line, text)
    assert "Traceback" in text

    _worker(f"s3://{name}/again", s3_server, "keep-patch")  # Ray Train's print as it is: the bug
    assert fs.cat(f"{name}/again/logs/rank_0.log").decode().count("a printed line") == 2


# ------------------------------------------------------------------------ a job, end to end
JOB = textwrap.dedent("""
    import os, sys
    from ar_fixtures import write_image_shards
    from system.config.load import load_config
    from toy_method import ToyExperiment
    from cluster.training import run_training

    shards = write_image_shards(sys.argv[1], 8, quality=90)
    cfg = load_config(ToyExperiment, [
        f"data.url={shards}", "data.resolution=16", "data.batch_size=2", "data.num_workers=0",
        "cluster.num_workers=1", "cluster.device=cpu", "cluster.local_num_cpus=2", "checkpoint.every_steps=2",
        "checkpoint.keep_last=1", "train.max_steps=4", "train.sample_grid=2", "optim.lr=0.01",
        "optim.warmup_steps=1", "logging.wandb_mode=disabled", "logging.log_every=1", "logging.progress=false",
        *sys.argv[2:]])
    res = run_training(cfg)
    print("RESULT", res.step, res.run_url)
""")


def _job(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "cluster")]),
           "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, as `python jobs/...` starts it
    proc = subprocess.run([sys.executable, "-c", JOB, str(tmp_path / "shards"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_quiet_run_on_s3_keeps_its_logs_there_through_a_worker_kill(bucket, s3_server, tmp_path):
    """logging.verbose=false, the run on S3, its only worker killed (os._exit) at step 3 and the pool
    restarted: the console shows our lines only, once each, and no Ray worker-death text; the
    driver's log and rank 0's output of both attempts are read back from <run>/logs/ on S3."""
    fs, name = bucket
    proc = _job(tmp_path, "run_name=quiet", f"checkpoint.storage_path=s3://{name}/runs",
                f"data.storage.endpoint_url={s3_server}", "logging.verbose=false", "fault.crash_at_step=3",
                "fault.crash_rank=0", "cluster.max_failures=1")
    console = proc.stdout + proc.stderr
    assert "worker died" not in console.lower() and "RayTrainWorker" not in console and "Traceback" not in console
    ours = [x for x in proc.stderr.splitlines() if x.startswith("[quiet]")]
    assert len(ours) == len(set(ours)) >= 4, ours  # start, checkpoints 2 and 4, resumed: once each
    assert any("(logs: s3://" in x for x in ours)

    run = f"{name}/runs/quiet"
    driver = fs.cat(f"{run}/logs/driver.log").decode()
    assert "checkpoint step 4" in driver and "resumed from" in driver
    assert driver.count(DEATH) == 1  # Ray's report, in the log instead of on the console
    rank0 = fs.cat(f"{run}/logs/rank_0.log").decode()
    for step in range(1, 5):  # steps 1-2 of the killed worker and 3-4 of its successor, each once
        assert len([x for x in rank0.splitlines() if x.startswith(f"[quiet] step {step} ")]) == 1, rank0
    assert rank0.count("[quiet] resumed from") == 1


@pytest.mark.slow
def test_verbose_run_prints_every_line_once(tmp_path):
    proc = _job(tmp_path, "run_name=loud", f"checkpoint.storage_path={tmp_path / 'runs'}", "logging.verbose=true")
    ours = [x for x in proc.stderr.splitlines() if x.startswith("[loud]")]
    assert len(ours) == len(set(ours)) >= 3, ours  # the driver's lines, once
    steps = [x for x in (proc.stdout + proc.stderr).splitlines() if "[loud] step " in x]
    assert len(steps) == 4, steps  # the worker's lines through Ray, once
    assert not (tmp_path / "runs" / "loud" / "logs" / "rank_0.log").exists()  # verbose: on the console instead
