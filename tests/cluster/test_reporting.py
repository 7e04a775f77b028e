"""wandb's offline run of a run on object storage reaches `<run>/wandb/` (at each commit and at the
end), on a local S3 endpoint; no Ray."""
from __future__ import annotations

import os
import uuid

import pytest


@pytest.fixture
def bucket(s3_server):
    import s3fs

    name = f"rep-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    fs.mkdir(name)
    return fs, name


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
