import json
import os
import uuid

import pytest
import torch

from cluster.checkpoint import MARKER, CheckpointStore, TrainState, commit_checkpoint, latest_complete, restore_checkpoint
from cluster.engine import DeepSpeedStrategy
from system.config import DeepSpeedConfig, OptimConfig, StorageConfig
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
def test_commit_restore_roundtrip(stage, dist_world1, tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    s, gen, state = _setup(stage, seed=0)
    it = iter(state.reader)
    _steps(s, gen, state, it, 3)
    ref = commit_checkpoint(store, s, {"gen": gen}, state, rank=0, world_size=1, barrier=lambda: None, run_name="t", keep_last=2)
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

    with pytest.raises(RuntimeError, match="written by 1 workers but this run has 2"):
        restore_checkpoint(store, ref, s2, {"gen": gen2}, state2, rank=0, world_size=2, run_name="t")
