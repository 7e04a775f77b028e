"""Resume from a damaged checkpoint: a truncated or bit-flipped file of the newest checkpoint (found
by one rank of two) is named in the log, the checkpoint is marked bad and every rank falls back to
the previous one, and the run ends bit-identical to an uninterrupted one; with no intact checkpoint
left the run stops with one clear error (before Ray when the driver sees it); checkpoints written
before checksums still load; retention keeps the checkpoint a resume verified; a storage outage
waited out with retries leaves the checkpointed random state (`rng.pt`) as it is, and so do the
reader's DataLoader workers."""
from __future__ import annotations

import contextlib
import io
import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multirank import run_ranks
from test_loop import cfg_for, run

OVER = ("deepspeed.zero_stage=2", "checkpoint.every_steps=2", "checkpoint.keep_last=5", "train.sample_every=0",
        "optim.grad_accum=1")


def _loop_rank(rank: int, world: int, storage: str, name: str, over: tuple) -> dict:
    from cluster.job import TrainJob, WorkerContext
    from cluster.loop import train_loop
    from test_loop import cfg_for
    from toy_method import MemoryReaderFactory, ToyMethod

    exp = cfg_for(storage, name, *over)
    job = TrainJob(method=ToyMethod, data=ToyMethod.resolve_data(exp), source=MemoryReaderFactory(32),
                   micro_batch_size=exp.data.batch_size)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        step = train_loop(exp, WorkerContext(rank, world, torch.device("cpu")), job)["step"]
    return {"step": step, "log": out.getvalue()}


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    path.write_bytes(bytes(data))


def test_damaged_newest_checkpoint_falls_back_on_every_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_STAGE_DIR", str(tmp_path / "stage"))
    storage, r = str(tmp_path), tmp_path / "damaged"
    ranks = lambda steps: run_ranks(_loop_rank, 2, storage, "damaged", (*OVER, f"train.max_steps={steps}"))  # noqa: E731
    run_ranks(_loop_rank, 2, storage, "straight", (*OVER, "train.max_steps=8"))  # the reference
    ranks(4)
    # rank 1's optimizer partition (read by rank 1 alone) truncated: rank 0 falls back with it
    _truncate(_ckpt(r, 4) / "gen" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    out = ranks(6)
    assert [o["step"] for o in out] == [6, 6]
    assert "step_00000004: gen/zero_pp_rank_1_mp_rank_00_optim_states.pt has" in out[0]["log"]
    assert "were written (truncated) (found by rank 1)" in out[0]["log"]
    assert f"resumed from {_ckpt(r, 2)} (step 2)" in out[0]["log"]
    # one bit of the whole EMA (read by rank 0 alone) flipped in the newest checkpoint, step 4 rewritten above
    _flip(_ckpt(r, 6) / "shared" / "ema_gen.safetensors")
    out = ranks(8)
    assert [o["step"] for o in out] == [8, 8]
    assert "step_00000006: shared/ema_gen.safetensors has other bytes than were written" in out[0]["log"]
    assert "(found by rank 0)" in out[0]["log"]
    assert f"resumed from {_ckpt(r, 4)} (step 4)" in out[0]["log"]
    sessions = [json.loads(x) for x in (r / "sessions.jsonl").read_text().splitlines()]
    assert [s["start_step"] for s in sessions] == [0, 2, 4]
    assert sorted(p.name for p in (r / "checkpoints").iterdir()) == [f"step_{s:08d}" for s in (2, 4, 6, 8)]
    assert not any((r / "checkpoints").glob("*/BAD"))  # the steps trained again were committed again
    for name in ("encoder", "decoder", "encoder_ema", "decoder_ema"):
        a = load_file(tmp_path / "straight" / "export" / f"{name}.safetensors")
        b = load_file(r / "export" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows = [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 9))  # every step once, the lost ones trained again


def test_no_intact_checkpoint_left_is_one_clear_error(dist_world1, tmp_path, monkeypatch):
    import ray

    from cluster.integrity import NoIntactCheckpoint
    from cluster.training import prepare_run
    from system.config import ConfigError

    monkeypatch.setenv("CKPT_STAGE_DIR", str(tmp_path / "stage"))
    run(cfg_for(tmp_path, "gone", *OVER, "train.max_steps=6", "checkpoint.export=false"))
    _truncate(_ckpt(tmp_path / "gone", 6) / "rank_00000" / "rng.pt")
    (_ckpt(tmp_path / "gone", 4) / "gen" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    (_ckpt(tmp_path / "gone", 2) / "COMMITTED").write_text('{"step": 2, "files": {"gen/')  # the marker itself
    log = io.StringIO()
    with pytest.raises(NoIntactCheckpoint, match=r"no intact checkpoint left.*step 6: rank_00000/rng.pt has \d+ bytes"
                                                  r".*step 4: gen/zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"
                                                  r".*step 2: COMMITTED cannot be read"):
        with contextlib.redirect_stdout(log):
            run(cfg_for(tmp_path, "gone", *OVER, "train.max_steps=8"))
    assert log.getvalue().count("marked") == 3 and "step_00000002" in log.getvalue()
    assert sorted(p.name for p in (tmp_path / "gone" / "checkpoints").iterdir()) == [f"step_{s:08d}" for s in (2, 4, 6)]
    if not ray.is_initialized():  # the driver says it in one line before any resource is taken
        with pytest.raises(ConfigError, match="no intact checkpoint left"):
            prepare_run(cfg_for(tmp_path, "gone", *OVER, "train.max_steps=8"))
        assert not ray.is_initialized()


def test_checkpoints_without_checksums_still_load(dist_world1, tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_STAGE_DIR", str(tmp_path / "stage"))
    run(cfg_for(tmp_path, "a", *OVER, "train.max_steps=4"))
    run(cfg_for(tmp_path, "b", *OVER, "train.max_steps=2"))
    marker = _ckpt(tmp_path / "b", 2) / "COMMITTED"
    old = json.loads(marker.read_text())
    marker.write_text(json.dumps({k: v for k, v in old.items() if k != "files"}))  # as written before checksums
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert run(cfg_for(tmp_path, "b", *OVER, "train.max_steps=4"))["step"] == 4
    assert "lists no file checksums (written before they were recorded): its files are loaded unchecked" in log.getvalue()
    a, b = (load_file(tmp_path / n / "export" / "decoder.safetensors") for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_retention_keeps_the_checkpoint_the_resume_verified(dist_world1, tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_STAGE_DIR", str(tmp_path / "stage"))
    run(cfg_for(tmp_path, "keep", *OVER, "train.max_steps=2", "checkpoint.keep_last=1"))
    run(cfg_for(tmp_path, "keep", *OVER, "train.max_steps=6", "checkpoint.keep_last=1"))
    assert sorted(p.name for p in (tmp_path / "keep" / "checkpoints").iterdir()) == ["step_00000002", "step_00000006"]


def test_storage_retries_leave_the_checkpointed_random_state(dist_world1, s3_server, tmp_path, monkeypatch):
    """Requests that fail and are retried (storage.py's back-off with jitter) change nothing a run
    checkpoints: every rng.pt is byte-identical to a run without failures."""
    import s3fs

    import system.data.storage as storage

    monkeypatch.setenv("CKPT_STAGE_DIR", str(tmp_path / "stage"))
    monkeypatch.setattr(storage, "_reached", set())
    bucket = f"rng-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True).mkdir(bucket)
    s3 = (f"checkpoint.storage_path=s3://{bucket}/runs", f"data.storage.endpoint_url={s3_server}",
          "data.storage.retry_max_delay_s=0.05", "checkpoint.export=false", "train.max_steps=4")
    run(cfg_for(tmp_path, "calm", *OVER, *s3))
    failed: list[str] = []
    real = s3fs.S3FileSystem._call_s3

    async def flaky(self, method, *args, **kwargs):  # each upload of a checkpoint file fails twice, then passes
        key = kwargs.get("Key", "")
        if method == "put_object" and "/checkpoints/" in key and failed.count(key) < 2:
            failed.append(key)
            raise ConnectionResetError("injected")
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", flaky)
    run(cfg_for(tmp_path, "outage", *OVER, *s3))
    assert len(failed) > 10  # the retries happened (twice for every checkpoint file)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    for step in (2, 4):
        calm, hit = (json.loads(fs.cat_file(f"{bucket}/runs/{n}/checkpoints/step_{step:08d}/COMMITTED"))["files"]
                     for n in ("calm", "outage"))
        assert calm["rank_00000/rng.pt"] == hit["rank_00000/rng.pt"], step


def test_resume_with_data_loader_workers_is_bit_identical(dist_world1, tmp_path, monkeypatch):
    """The reader's DataLoader draws its workers' base seed from a generator of its own, not from the
    checkpointed global torch RNG (a resumed run would draw once more than an uninterrupted one)."""
    from ar_fixtures import write_image_shards
    from cluster.job import ImageShards, TrainJob, WorkerContext
    from cluster.loop import train_loop
    from toy_method import ToyMethod

    monkeypatch.setenv("CKPT_STAGE_DIR", str(tmp_path / "stage"))
    url = write_image_shards(str(tmp_path / "shards"), 24, side=12)

    def train(name: str, steps: int) -> None:
        exp = cfg_for(tmp_path, name, *OVER, f"train.max_steps={steps}", f"data.url={url}", "data.num_workers=1")
        job = TrainJob(method=ToyMethod, data=ToyMethod.resolve_data(exp), source=ImageShards(), micro_batch_size=2)
        train_loop(exp, WorkerContext(0, 1, torch.device("cpu")), job)

    train("straight", 4)
    train("split", 2)
    train("split", 4)
    for name in ("decoder", "decoder_ema"):
        a, b = (load_file(tmp_path / n / "export" / f"{name}.safetensors") for n in ("straight", "split"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
