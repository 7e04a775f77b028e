"""wandb's offline run and the run's logs of a run on object storage reach `<run>/wandb/` and `<run>/logs/`
(at each commit and at the end), on a local S3 endpoint; no Ray."""
from __future__ import annotations

import os

import pytest


def test_sync_wandb_dir_uploads_new_and_changed_files(bucket, s3_server, tmp_path):
    from cluster.reporting import sync_wandb_dir
    from system.config import StorageConfig

    fs, name = bucket
    st = StorageConfig(endpoint_url=s3_server)
    local = tmp_path / "wandb"
    (local / "offline-run-1" / "files").mkdir(parents=True)
    (local / "offline-run-1" / "run-x.wandb").write_bytes(b"abc")
    (local / "offline-run-1" / "files" / "config.yaml").write_text("a: 1")
    os.symlink(local / "offline-run-1", local / "latest-run")  # wandb's links are not copied
    seen: dict = {}
    assert sync_wandb_dir(str(local), f"s3://{name}/r", st, seen) == 2
    assert sorted(fs.find(f"{name}/r/wandb")) == [f"{name}/r/wandb/offline-run-1/files/config.yaml",
                                                  f"{name}/r/wandb/offline-run-1/run-x.wandb"]
    assert sync_wandb_dir(str(local), f"s3://{name}/r", st, seen) == 0  # nothing changed
    (local / "offline-run-1" / "run-x.wandb").write_bytes(b"abcdef")
    assert sync_wandb_dir(str(local), f"s3://{name}/r", st, seen) == 1
    fs.invalidate_cache()
    assert fs.cat(f"{name}/r/wandb/offline-run-1/run-x.wandb") == b"abcdef"


def test_run_logger_uploads_wandb_offline_run_at_commit_and_end(bucket, s3_server, tmp_path, monkeypatch):
    from cluster.checkpoint import CheckpointStore
    from cluster.reporting import RunLogger
    from system.config import StorageConfig
    from system.config.load import load_config
    from toy_method import ToyExperiment

    monkeypatch.setenv("WANDB_MODE", "offline")
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where wandb's local folder goes
    fs, name = bucket
    cfg = load_config(ToyExperiment, ["run_name=rep", f"data.url={tmp_path}", f"checkpoint.storage_path=s3://{name}/runs",
                                      "logging.wandb_mode=offline", "logging.progress=false", "train.max_steps=3"])
    store = CheckpointStore(f"s3://{name}/runs/rep", StorageConfig(endpoint_url=s3_server))
    logger = RunLogger(cfg, store, start_step=0, enabled=True)
    assert logger.wandb is not None and logger.wandb_dir.startswith(str(tmp_path))
    logger.log(1, {"loss": 1.0})
    logger.flush()  # a commit
    fs.invalidate_cache()
    assert fs.glob(f"{name}/runs/rep/wandb/offline-run-*/*"), "nothing of wandb's run uploaded at the commit"
    logger.log(2, {"loss": 0.5})
    logger.close()
    fs.invalidate_cache()
    runs = fs.glob(f"{name}/runs/rep/wandb/offline-run-*/run-*.wandb")
    assert len(runs) == 1 and fs.size(runs[0]) > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("wandb-rep-")]  # the local copy is gone


@pytest.fixture
def own_logs(monkeypatch):
    """A fresh registry of run logs for the test (no exit hook registered)."""
    import cluster.reporting as R

    monkeypatch.setattr(R, "_LOGS", [])
    monkeypatch.setattr(R, "_at_exit", [None])
    return R._LOGS


def test_run_log_on_object_storage_uploads_changes_and_continues(bucket, s3_server, tmp_path, own_logs):
    from cluster.reporting import run_log, sync_logs
    from system.config import StorageConfig

    fs, name = bucket
    st = StorageConfig(endpoint_url=s3_server)
    path, url = run_log(f"s3://{name}/r", "rank_0.log", st)
    assert url == f"s3://{name}/r/logs/rank_0.log" and not path.startswith(str(tmp_path))
    with open(path, "a") as f:
        f.write("first\n")
    assert sync_logs()
    assert fs.cat(f"{name}/r/logs/rank_0.log") == b"first\n"
    fs.rm(f"{name}/r/logs/rank_0.log")
    assert sync_logs() and not fs.exists(f"{name}/r/logs/rank_0.log")  # unchanged: not uploaded again
    with open(path, "a") as f:
        f.write("second\n")
    assert sync_logs(final=True)
    assert fs.cat(f"{name}/r/logs/rank_0.log") == b"first\nsecond\n"
    assert not own_logs and not os.path.exists(path)  # done: the local copy is gone

    path2, _ = run_log(f"s3://{name}/r", "rank_0.log", st)  # a restarted worker / resubmitted job
    with open(path2, "a") as f:
        f.write("third\n")
    sync_logs(final=True)
    fs.invalidate_cache()
    assert fs.cat(f"{name}/r/logs/rank_0.log") == b"first\nsecond\nthird\n"  # continued, not replaced


def test_run_log_of_a_local_run_is_written_in_place(tmp_path, own_logs):
    from cluster.reporting import run_log

    path, where = run_log(str(tmp_path / "run"), "driver.log")
    assert path == where == str(tmp_path / "run" / "logs" / "driver.log") and os.path.isdir(tmp_path / "run" / "logs")
    assert not own_logs


def test_a_log_upload_failure_is_logged_and_quick_at_exit(tmp_path, own_logs, caplog):
    import time

    from cluster.reporting import RunLogFile, sync_logs
    from system.config import StorageConfig

    local = tmp_path / "driver.log"
    local.write_text("line\n")
    dead = StorageConfig(endpoint_url="http://127.0.0.1:9", retry_budget_s=600.0)  # nothing listens on port 9
    own_logs.append(RunLogFile(str(local), "s3://nowhere/r/logs/driver.log", dead, str(tmp_path / "gone")))
    t = time.monotonic()
    with caplog.at_level("WARNING", logger="cluster.reporting"):
        assert sync_logs(final=True, quick=True) is False
    assert time.monotonic() - t < 30
    assert "uploading the log" in caplog.text and own_logs  # kept: not uploaded


def test_a_run_flushes_its_own_logs_not_an_earlier_runs_on_a_storage_that_is_gone(tmp_path, own_logs):
    """An earlier run of this process whose log could not be uploaded (its storage gone) must not
    make a later run wait out that storage's retry budget at each of its commits (a test session
    hung there for 10 minutes): `sync_logs(run_url=...)` syncs that run's logs only."""
    from cluster.reporting import RunLogFile, sync_logs

    synced = []

    class Log(RunLogFile):
        def sync(self, quick=False):
            synced.append((self.url, quick))
            return not self.url.startswith("s3://gone/")

    for url in ("s3://gone/old/logs/rank_0.log", "s3://live/new/logs/rank_0.log"):
        own_logs.append(Log(str(tmp_path / "x.log"), url, None, str(tmp_path / "tmp")))
    assert sync_logs(run_url="s3://live/new") is True
    assert synced == [("s3://live/new/logs/rank_0.log", False)]
    synced.clear()
    assert sync_logs(final=True, quick=True) is False  # a new run's start: one attempt each
    assert synced == [("s3://gone/old/logs/rank_0.log", True), ("s3://live/new/logs/rank_0.log", True)]
    assert [f.url for f in own_logs] == ["s3://gone/old/logs/rank_0.log"]  # kept for a later attempt
    synced.clear()
    assert sync_logs() is False  # a later run's driver at a checkpoint: the ended run's log gets a quick one
    assert synced == [("s3://gone/old/logs/rank_0.log", True)]
