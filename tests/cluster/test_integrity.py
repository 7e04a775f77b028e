"""Checkpoints that verify themselves: every file's size and SHA-256 are taken while it is written
(DeepSpeed's files included, none read back), listed in the commit marker, and a fetched file that
differs (truncated, bit-flipped, missing) is named; retention never deletes the last verified
checkpoint and does not count bad ones as kept."""
import hashlib
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

import cluster.checkpoint
from cluster.checkpoint import BAD, MARKER, CheckpointStore, commit_checkpoint
from cluster.integrity import DamagedCheckpoint, NoIntactCheckpoint, check, hash_file, save_tensors, save_torch
from test_checkpoint import _fake_checkpoint, _setup, _steps


def test_digests_are_taken_while_writing(tmp_path):
    obj = {"a": torch.arange(1000, dtype=torch.float32), "n": 3}
    d = save_torch(obj, str(tmp_path / "x" / "state.pt"))
    data = (tmp_path / "x" / "state.pt").read_bytes()
    assert d.size == len(data) and d.sha256 == hashlib.sha256(data).hexdigest() == hash_file(str(tmp_path / "x" / "state.pt")).sha256
    assert torch.equal(torch.load(tmp_path / "x" / "state.pt", weights_only=True)["a"], obj["a"])
    t = {"w": torch.randn(7, 3), "b": torch.zeros(2, dtype=torch.bfloat16)}
    d = save_tensors(t, str(tmp_path / "ema.safetensors"))
    assert d == hash_file(str(tmp_path / "ema.safetensors"))
    assert all(torch.equal(v, load_file(tmp_path / "ema.safetensors")[k]) for k, v in t.items())


def test_check_names_the_damage(tmp_path):
    path = str(tmp_path / "f.pt")
    want = save_torch({"a": torch.ones(100)}, path)
    check(path, want, "s3://b/run/checkpoints/step_00000004", "gen/f.pt")  # intact: no error
    data = bytearray(open(path, "rb").read())
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(DamagedCheckpoint, match=r"step_00000004 is damaged: gen/f.pt has \d+ bytes, \d+ were written \(truncated\)"):
        check(path, want, "s3://b/run/checkpoints/step_00000004", "gen/f.pt")
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))
    with pytest.raises(DamagedCheckpoint, match=r"gen/f.pt has other bytes than were written") as err:
        check(path, want, "u", "gen/f.pt")
    again = pickle.loads(pickle.dumps(err.value))  # crosses processes (the ranks' agreement) intact
    assert (again.url, again.file, str(again)) == ("u", "gen/f.pt", str(err.value))


@pytest.mark.parametrize("stage", [2, 3])
def test_marker_lists_every_file_hashed_while_written(stage, dist_world1, tmp_path, monkeypatch):
    """The marker holds the size and SHA-256 of every file of the checkpoint (DeepSpeed's, the EMA,
    the per-rank state), all reported by the writers: nothing is read back to hash it."""
    monkeypatch.setenv("CKPT_STAGE_DIR", str(tmp_path / "stage"))
    store = CheckpointStore(str(tmp_path / "run"))
    s, gen, state = _setup(stage, seed=0)
    _steps(s, gen, state, iter(state.reader), 2)

    def no_reread(path):
        raise AssertionError(f"{path} was read back to hash it")

    monkeypatch.setattr(cluster.checkpoint, "hash_file", no_reread)
    commit_checkpoint(store, s, {"gen": gen}, state, rank=0, world_size=1, run_name="t", keep_last=2)
    marker = json.loads((tmp_path / "run" / "checkpoints" / "step_00000002" / MARKER).read_text())
    assert marker["step"] == 2 and marker["world_size"] == 1
    folder = tmp_path / "run" / "checkpoints" / "step_00000002"
    on_disk = {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file() and p.name != MARKER}
    assert set(marker["files"]) == set(on_disk)
    assert {"shared/state.json", "rank_00000/rng.pt", "rank_00000/reader.pt", "rank_00000/method.pt"} <= set(on_disk)
    assert any(k.startswith("gen/") and "optim_states" in k for k in on_disk)
    for rel, path in on_disk.items():
        data = path.read_bytes()
        assert marker["files"][rel] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel


def test_retention_keeps_the_last_verified_and_skips_bad_ones(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    for step in (10, 20, 30, 40):
        _fake_checkpoint(store, tmp_path, step, commit=True)
    assert store.prune(keep_last=1, verified=10) == [20, 30]  # the last one a resume checked stays
    assert sorted(store.steps()) == [10, 40]
    store.mark_bad(40, {"gen/w.pt": "is truncated"})
    assert store.latest_complete().step == 10  # a bad checkpoint is never chosen
    _fake_checkpoint(store, tmp_path, 50, commit=True)
    _fake_checkpoint(store, tmp_path, 60, commit=True)
    store.mark_bad(60, {"gen/w.pt": "has other bytes"})
    assert store.prune(keep_last=1) == [10, 40]  # keeps 50: the bad 60 does not count as kept
    assert sorted(store.steps()) == [50, 60] and store.latest_complete().step == 50
    store.mark_bad(50, {"rank_00000/rng.pt": "is missing"})
    with pytest.raises(NoIntactCheckpoint, match=r"no intact checkpoint left.*step 60: gen/w.pt has other bytes; "
                                                 r"step 50: rank_00000/rng.pt is missing"):
        store.latest_complete()
    store.commit(60, {"world_size": 1})  # rewritten after a fallback: the new marker replaces the bad mark
    assert not (tmp_path / "run" / "checkpoints" / "step_00000060" / BAD).exists()
    assert store.latest_complete().step == 60
