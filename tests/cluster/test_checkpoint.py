import errno
import json
import multiprocessing
import os
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Callable

import pytest
from s3_restartable import RestartableS3
import torch

from cluster.checkpoint import (MARKER, STAGE_ENV, CheckpointStore, TrainState, commit_checkpoint, latest_complete,
                                staging_dir)
from cluster.restore import restore_checkpoint
from cluster.engine import DeepSpeedStrategy
from system.config import DeepSpeedConfig, OptimConfig, StorageConfig
from system.data.storage import StorageError
from system.train_utils import EMA
from system.methods.base import DataSpec
from toy_method import MemoryReader, ToyConfig, ToyGenerator, ToyMethod


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        yield CheckpointStore(str(tmp_path / "run"))
        return
    import s3fs

    endpoint = request.getfixturevalue("s3_server")
    bucket = f"ckpt-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir(bucket)
    yield CheckpointStore(f"s3://{bucket}/runs/r1", StorageConfig(endpoint_url=endpoint))


def _fake_checkpoint(store: CheckpointStore, tmp_path, step: int, commit: bool) -> None:
    local = tmp_path / f"stage{step}"
    (local / "gen").mkdir(parents=True)
    (local / "gen" / "w.pt").write_bytes(b"x" * 10)
    (local / "rank_00000").mkdir()
    (local / "rank_00000" / "rng.pt").write_bytes(b"r")
    store.upload(str(local), step)
    if commit:
        store.commit(step, {"world_size": 1})


def test_marker_retention_and_incomplete(store, tmp_path):
    assert store.latest_complete() is None and store.steps() == {}
    for step in (10, 20, 30):
        _fake_checkpoint(store, tmp_path, step, commit=True)
    _fake_checkpoint(store, tmp_path, 40, commit=False)  # interrupted write: no marker
    ref = store.latest_complete()
    assert ref.step == 30 and ref.url.endswith("checkpoints/step_00000030")
    assert latest_complete(store.run_url, store.storage).step == 30
    assert json.loads(store.read_bytes(f"checkpoints/step_00000030/{MARKER}"))["step"] == 30
    assert store.prune(keep_last=2) == [10]
    assert store.steps() == {20: True, 30: True, 40: False}
    assert store.remove_incomplete(after=30) == [40]
    assert store.steps() == {20: True, 30: True}
    out = store.download(30, str(tmp_path / "dl"), ["gen", "rank_00000", "absent"])
    assert (tmp_path / "dl" / "gen" / "w.pt").read_bytes() == b"x" * 10
    assert os.path.exists(os.path.join(out, "rank_00000", "rng.pt"))
    store.write_bytes("metrics.jsonl", b"{}\n")
    assert store.read_bytes("metrics.jsonl") == b"{}\n" and store.read_bytes("nope") is None


def test_checkpoint_in_progress_is_not_complete(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    _fake_checkpoint(store, tmp_path, 5, commit=True)
    _fake_checkpoint(store, tmp_path, 6, commit=False)
    assert store.latest_complete().step == 5
    assert store.prune(keep_last=1) == []  # never deletes a newer unmarked checkpoint (may be in progress)


def _setup(stage: int, seed: int):
    torch.manual_seed(seed)
    s = DeepSpeedStrategy(DeepSpeedConfig(zero_stage=stage), OptimConfig(lr=1e-2), torch.device("cpu"), micro_batch_size=2, world_size=1)
    gen = s.prepare(ToyGenerator(), lr=1e-2, betas=(0.9, 0.95))
    ema = EMA(s.local_params(gen), 0.9)
    reader = MemoryReader(8, rank=0, world_size=1, batch_size=2, resolution=8, seed=0)
    method = ToyMethod(ToyConfig(gan=False), DataSpec(8, 1))
    state = TrainState(step=0, emas={"gen": ema}, ema_partitioned=s.is_partitioned(gen), reader=reader, method=method,
                       modules={"gen": gen.module})
    return s, gen, state


def _steps(s, gen, state, it, n):
    for _ in range(n):
        batch = next(it)
        out = state.method.step("gen", {"gen": gen.module}, batch, state.step, {})
        s.backward(gen, out.loss)
        s.step(gen)
        state.emas["gen"].update(s.local_params(gen))
        state.step += 1


@pytest.mark.parametrize("stage", [2, 3])
def test_commit_restore_roundtrip(stage, dist_world1, tmp_path, stage_dir):
    store = CheckpointStore(str(tmp_path / "run"))
    s, gen, state = _setup(stage, seed=0)
    it = iter(state.reader)
    _steps(s, gen, state, it, 3)
    ref = commit_checkpoint(store, s, {"gen": gen}, state, rank=0, world_size=1, run_name="t", keep_last=2)
    assert ref.step == 3 and store.latest_complete() == ref
    files = store.fs.find(store._path("checkpoints"))
    assert any(f.endswith("rank_00000/rng.pt") for f in files) and any("/gen/" in f for f in files)
    assert any(f.endswith("ema_gen.safetensors") for f in files) and any(f.endswith("rank_00000/buffers.pt") for f in files)
    _steps(s, gen, state, it, 2)  # the uninterrupted continuation
    want_params = s.gathered_state_dict(gen)
    want_ema = {k: v.clone() for k, v in state.emas["gen"].shadow.items()}

    s2, gen2, state2 = _setup(stage, seed=7)
    restore_checkpoint(store, ref, s2, {"gen": gen2}, state2, rank=0, world_size=1, run_name="t")
    assert state2.step == 3 and state2.method.calls == 3 and state2.reader.state_dict() == {"epoch": 0, "pos": 6}
    _steps(s2, gen2, state2, iter(state2.reader), 2)
    got = s2.gathered_state_dict(gen2)
    assert all(torch.equal(want_params[k], got[k]) for k in want_params)
    assert all(torch.equal(want_ema[k], state2.emas["gen"].shadow[k]) for k in want_ema)
    assert _left(stage_dir) == []


# ---------------------------------------------------------------------------- a location that cannot be listed
def test_fresh_run_under_an_existing_root(tmp_path):
    """The run folder does not exist yet (a new run) while its storage root does: a fresh run."""
    (tmp_path / "runs").mkdir()
    store = CheckpointStore(str(tmp_path / "runs" / "new"))
    assert store.latest_complete() is None and store.steps() == {}
    assert CheckpointStore(f"file://{tmp_path}/runs/new").latest_complete() is None


def test_missing_local_root_is_an_error(tmp_path):
    """A storage root that is not there (a typo, a volume not mounted on this node) is not "no checkpoints"."""
    root = tmp_path / "not_mounted"
    with pytest.raises(StorageError, match=str(root)):
        CheckpointStore(str(root / "run")).latest_complete()
    (tmp_path / "a_file").write_bytes(b"x")
    with pytest.raises(StorageError, match="a_file"):
        CheckpointStore(str(tmp_path / "a_file" / "run")).latest_complete()


def _deny(monkeypatch, fn_name: str, denied: Callable[[str], bool]) -> None:
    """Make `os.<fn_name>` fail with EACCES for paths where `denied(path)` (we run as root: chmod would not do)."""
    real = getattr(os, fn_name)

    def fake(path, *args, **kwargs):
        if denied(os.fspath(path)):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, fn_name, fake)


def test_unreadable_checkpoints_folder_is_an_error(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path / "run"))
    _fake_checkpoint(store, tmp_path, 10, commit=True)
    _deny(monkeypatch, "scandir", lambda p: p.rstrip("/").endswith("checkpoints"))
    with pytest.raises(StorageError, match=f"{tmp_path}/run/checkpoints"):
        store.latest_complete()


def test_unreadable_marker_is_an_error_not_an_unfinished_checkpoint(tmp_path, monkeypatch):
    """A marker that cannot be checked must not read as absent: the checkpoint would be skipped (resume
    from an older one) and even deleted as unfinished."""
    store = CheckpointStore(str(tmp_path / "run"))
    _fake_checkpoint(store, tmp_path, 10, commit=True)
    _deny(monkeypatch, "stat", lambda p: p.endswith(MARKER))
    with pytest.raises(StorageError, match="step_00000010"):
        store.latest_complete()


@pytest.fixture
def s3_storage(s3_server):
    import s3fs

    bucket = f"ckpt-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}).mkdir(bucket)
    return bucket, StorageConfig(endpoint_url=s3_server, max_attempts=1)


def test_s3_fresh_run_and_missing_bucket(s3_storage):
    bucket, storage = s3_storage
    assert CheckpointStore(f"s3://{bucket}/runs/new", storage).latest_complete() is None  # no objects yet: fresh
    with pytest.raises(StorageError, match=f"s3://{bucket}-absent"):
        CheckpointStore(f"s3://{bucket}-absent/runs/new", storage).latest_complete()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_unreachable_endpoint_is_an_error(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    store = CheckpointStore("s3://bucket/runs/r1", StorageConfig(endpoint_url=endpoint, max_attempts=1))
    with pytest.raises(StorageError, match=r"s3://bucket/runs/r1") as err:
        store.latest_complete()
    assert endpoint in str(err.value)


def test_prepare_run_stops_on_an_unreachable_store(monkeypatch, tmp_path):
    """The driver refuses to start (no Ray, no step 0) when the run's checkpoints cannot be listed."""
    import cluster.console
    from cluster.training import prepare_run
    from system.config import ConfigError
    from system.config.load import load_config
    from toy_method import ToyExperiment

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setattr(cluster.console, "setup_driver_logging", lambda *args, **kwargs: None)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    exp = load_config(ToyExperiment, ["run_name=r1", f"data.url={tmp_path}", "checkpoint.storage_path=s3://bucket/runs",
                                      f"data.storage.endpoint_url={endpoint}", "data.storage.max_attempts=1"])
    with pytest.raises(ConfigError, match=r"checkpoint.storage_path.*s3://bucket/runs/r1"):
        prepare_run(exp)


# ---------------------------------------------------------------------------- local staging
class FakeStrategy:
    """Writes a DeepSpeed-like file per engine (or raises after writing part of it)."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def save(self, engine, directory: str, tag: str) -> None:
        os.makedirs(os.path.join(directory, tag), exist_ok=True)
        with open(os.path.join(directory, tag, "model_states.pt"), "wb") as f:
            f.write(b"w" * 1024)
            if self.fail:
                raise OSError(errno.ENOSPC, "No space left on device")

    def load(self, engine, directory: str, tag: str) -> None:
        assert os.path.exists(os.path.join(directory, tag, "model_states.pt"))


@pytest.fixture
def stage_dir(tmp_path, monkeypatch) -> Path:
    """Staging in this test's folder, never the machine's /tmp/ckpt_stage (other processes use it)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the default: <tempdir>/ckpt_stage
    (tmp_path / "tmp").mkdir()
    stage = tmp_path / "tmp" / "ckpt_stage"
    monkeypatch.setenv(STAGE_ENV, str(stage))
    return stage


def _commit(store, step: int, strategy=None, run_name: str = "t"):
    return commit_checkpoint(store, strategy or FakeStrategy(), {"gen": None}, TrainState(step=step), rank=0,
                             world_size=1, run_name=run_name, keep_last=2)


def _left(stage: Path) -> list[str]:
    return sorted(str(p.relative_to(stage)) for p in stage.rglob("*")) if stage.exists() else []


def test_failed_save_leaves_no_staging_files(stage_dir, tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    with pytest.raises(OSError, match="No space left"):
        _commit(store, 1, FakeStrategy(fail=True))
    assert _left(stage_dir) == []
    assert store.latest_complete() is None


def test_saves_and_restores_leave_no_folders(stage_dir, tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    for step in (1, 2, 3):
        _commit(store, step)
    assert store.latest_complete().step == 3 and _left(stage_dir) == []
    state = restore_checkpoint(store, store.latest_complete(), FakeStrategy(), {"gen": None}, TrainState(step=0), rank=0,
                               world_size=1, run_name="t")
    assert state.step == 3 and _left(stage_dir) == []
    with pytest.raises(RuntimeError, match="written by 1 workers.*cannot re-partition"):  # fails after a download
        restore_checkpoint(store, store.latest_complete(), FakeStrategy(), {"gen": None}, TrainState(step=0), rank=0,
                           world_size=2, run_name="t")
    assert _left(stage_dir) == []


def _killed_writer(run_name: str) -> None:
    """A child process that dies (no finally blocks run) in the middle of staging a checkpoint."""
    d = staging_dir(run_name, 5, 0, "save")
    os.makedirs(os.path.join(d, "gen"))
    with open(os.path.join(d, "gen", "model_states.pt"), "wb") as f:
        f.write(b"w" * 1024)
    os._exit(1)


def test_stale_staging_of_dead_processes_is_removed(stage_dir, tmp_path):
    proc = multiprocessing.get_context("fork").Process(target=_killed_writer, args=("t",))
    proc.start()
    proc.join()
    assert proc.exitcode == 1
    dead = proc.pid
    stale = _left(stage_dir)
    assert stale and all(str(dead) in p for p in stale)
    (stage_dir / f"t-{dead}" / "step_00000004" / "rank_00000").mkdir(parents=True)  # the former layout
    alive = stage_dir / f"t-{os.getppid()}"  # a live process's staging is left alone
    (alive / "step_00000004").mkdir(parents=True)
    other = stage_dir / "not-ours"
    other.mkdir()
    _commit(CheckpointStore(str(tmp_path / "run")), 6)
    assert _left(stage_dir) == ["not-ours", alive.name, f"{alive.name}/step_00000004"]


# ---------------------------------------------------------------------------- storage outages
def test_commit_and_restore_wait_out_a_storage_outage(s3_server, stage_dir, monkeypatch):
    """Every request of a commit (upload, marker, listing, pruning) and of a restore goes through
    storage.py's retrying filesystem: an endpoint outage of a few seconds delays them, loses nothing."""
    import time

    import s3fs

    import system.data.storage as storage

    monkeypatch.setattr(storage, "_reached", set())
    monkeypatch.delenv(storage.REACHED_ENV, raising=False)
    srv = RestartableS3().start()
    try:
        bucket = f"outage-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(client_kwargs={"endpoint_url": srv.url}, skip_instance_cache=True).mkdir(bucket)
        cfg = StorageConfig(endpoint_url=srv.url, max_attempts=1, retry_budget_s=60, retry_max_delay_s=0.5)
        store = CheckpointStore(f"s3://{bucket}/runs/r1", cfg)
        assert store.latest_complete() is None  # the endpoint answered: outages are waited out from now on
        _commit(store, 1)
        t, t0 = srv.outage(2.0), time.monotonic()
        _commit(store, 2)
        t.join()
        assert time.monotonic() - t0 >= 1.5 and store.latest_complete().step == 2
        t = srv.outage(2.0)
        state = restore_checkpoint(store, store.latest_complete(), FakeStrategy(), {"gen": None}, TrainState(step=0),
                                   rank=0, world_size=1, run_name="t")
        t.join()
        assert state.step == 2 and sorted(store.steps()) == [1, 2]
    finally:
        srv.stop()
