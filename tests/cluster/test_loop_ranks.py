"""The rank loop on 2 and 3 ranks (spawned processes, gloo, DeepSpeed on CPU; no Ray): a run
continues on another number of ranks with every sample of the epoch seen exactly once; SIGTERM on
one rank makes every rank commit at the next step boundary and stop, and the run resumes from
that checkpoint as if uninterrupted; a preemption notice commits once and training goes on."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from multirank import run_ranks

COMMON = ["data.url=unused", "data.resolution=8", "data.batch_size=2", "train.sample_every=0", "train.sample_grid=2",
          "optim.grad_accum=1", "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=0.01",
          "logging.wandb_mode=disabled", "logging.progress=false", "logging.log_every=1", "checkpoint.export=false",
          "checkpoint.keep_last=5"]


def _cfg(storage: str, name: str, *over: str):
    from system.config.load import load_config
    from toy_method import ToyExperiment

    return load_config(ToyExperiment, [f"run_name={name}", f"checkpoint.storage_path={storage}", *COMMON, *over])


def _loop_rank(rank: int, world: int, storage: str, name: str, over: tuple, source: str, n: int) -> dict:
    from cluster.job import TrainJob, WorkerContext
    from cluster.loop import Preempted, train_loop
    from toy_method import GlobalMemoryReaderFactory, MemoryReaderFactory, ToyImages, ToyMethod

    from system.data.sources import ImageShards

    exp = _cfg(storage, name, *over)
    factory = {"global": lambda: GlobalMemoryReaderFactory(n), "rank": lambda: MemoryReaderFactory(n),
               "shards": ImageShards}[source]()
    job = TrainJob(method=ToyMethod, data=ToyImages().resolve(exp), source=factory, micro_batch_size=exp.data.batch_size)
    reports: list[int] = []
    ctx = WorkerContext(rank, world, torch.device("cpu"), report=lambda m, url: reports.append(m["step"]))
    try:
        return {"step": train_loop(exp, ctx, job)["step"], "reports": reports}
    except Preempted as e:
        return {"preempted": e.step, "reports": reports}


def _key_log(folder: Path) -> dict[int, list[tuple[int, list[str]]]]:
    out = {}
    for f in sorted(folder.glob("keys_rank*.jsonl")):
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        out[int(f.stem.removeprefix("keys_rank"))] = [(r["step"], r["keys"]) for r in rows]
    return out


def _sessions(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "sessions.jsonl").read_text().splitlines()]


def _shard_set(root: Path, n: int) -> str:
    """`n` small JPEGs in two shards (as jobs/make_shards.py writes them)."""
    from ar_fixtures import write_image_shards

    return write_image_shards(str(root), n, side=12)


@pytest.mark.parametrize("source", ["global", "shards"])
def test_two_ranks_then_three_see_every_sample_of_the_epoch_once(source, tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_STAGE_DIR", str(tmp_path / "stage"))
    keys = tmp_path / "keys"
    over = ("deepspeed.zero_stage=3", "checkpoint.every_steps=3", f"method.key_log={keys}")
    if source == "shards":  # the image shard reader (its state is the same on every rank, for any world size)
        over += (f"data.url={_shard_set(tmp_path / 'shards', 24)}", "data.num_workers=0")
    # 24 samples, batch 2: 3 steps on 2 ranks (12 samples), then 2 steps on 3 ranks (12): one epoch
    out = run_ranks(_loop_rank, 2, str(tmp_path), "grow", (*over, "train.max_steps=3"), source, 24)
    assert [o["step"] for o in out] == [3, 3]
    out = run_ranks(_loop_rank, 3, str(tmp_path), "grow", (*over, "train.max_steps=5"), source, 24)
    assert [o["step"] for o in out] == [5, 5, 5] and out[0]["reports"] == [5]
    assert [(s["start_step"], s["world_size"]) for s in _sessions(tmp_path / "grow")] == [(0, 2), (3, 3)]
    log = _key_log(keys)
    assert sorted(log) == [0, 1, 2]
    seen = Counter(k for rows in log.values() for _, batch in rows for k in batch)
    assert len(seen) == 24 and set(seen.values()) == {1}  # every sample of the epoch exactly once
    assert [s for s, _ in log[2]] == [3, 4] and [s for s, _ in log[0]] == [0, 1, 2, 3, 4]
    rows = [json.loads(x) for x in (tmp_path / "grow" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and all(r["loss"] == r["loss"] for r in rows)  # finite
    assert sorted(p.name for p in (tmp_path / "grow" / "checkpoints").iterdir()) == ["step_00000003", "step_00000005"]


def _reader_bad(run: Path, step: int) -> dict[int, set[int]]:
    """rank -> the unreadable sample ids its reader state of checkpoint `step` counts (`skipped`)."""
    out = {}
    for d in sorted((run / "checkpoints" / f"step_{step:08d}").glob("rank_*")):
        state = torch.load(d / "reader.pt", weights_only=True)
        out[int(d.name.removeprefix("rank_"))] = {i for iv in state["bad"].values() for a, b in iv for i in range(a, b)}
    return out


@pytest.mark.parametrize("worlds", [(2, 3, 2)])
def test_skipped_stays_exact_across_resizes_with_a_garbage_shard(worlds, tmp_path, monkeypatch):
    """One garbage shard of four (48 samples, batch 2): 2 ranks x 4 steps, 3 ranks x 2 steps, 2 ranks
    x 5 steps make one epoch. After each resize every new rank gets every old rank's unreadable ids
    (cluster/restore.py) and continues its share: the ranks' counts never hold an id twice and add up
    to the bad samples met; at the end of the epoch those are all 12. Every readable sample comes
    once in its place, and the 12 substitutes are 12 different readable samples."""
    from ar_fixtures import garble_shard, write_image_shards

    monkeypatch.setenv("CKPT_STAGE_DIR", str(tmp_path / "stage"))
    keys, run = tmp_path / "keys", tmp_path / "resized"
    url = write_image_shards(str(tmp_path / "shards"), 48, side=12, num_shards=4)
    bad = set(garble_shard(url, 2))
    over = ("deepspeed.zero_stage=1", "checkpoint.every_steps=100", f"method.key_log={keys}", f"data.url={url}",
            "data.num_workers=0", "method.gan=false")
    met: set[int] = set()
    for world, steps in zip(worlds, (4, 6, 11)):
        out = run_ranks(_loop_rank, world, str(tmp_path), "resized", (*over, f"train.max_steps={steps}"), "shards", 48)
        assert [o["step"] for o in out] == [steps] * world
        counts = _reader_bad(run, steps)
        assert sorted(counts) == list(range(world))
        union = set().union(*counts.values())
        assert sum(len(c) for c in counts.values()) == len(union), counts  # no id counted by two ranks
        assert met <= union <= bad  # the ids met before the resize are all still counted
        met = union
    assert met == bad
    seen = Counter(k for rows in _key_log(keys).values() for _, batch in rows for k in batch)
    assert sum(seen.values()) == 48 and len(seen) == 36 and max(seen.values()) == 2  # 12 substitutes, all different


def _expected_keys(n: int, world: int, steps: int) -> dict[int, list[tuple[int, list[str]]]]:
    from toy_method import MemoryReader

    out = {}
    for r in range(world):
        it = iter(MemoryReader(n, rank=r, world_size=world, batch_size=2, resolution=8, seed=0))
        out[r] = [(s, next(it)["key"]) for s in range(steps)]
    return out


def test_sigterm_on_one_rank_commits_and_the_run_resumes_from_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_STAGE_DIR", str(tmp_path / "stage"))
    keys = tmp_path / "keys"
    over = ("deepspeed.zero_stage=2", "checkpoint.every_steps=100", "train.max_steps=6", f"method.key_log={keys}")
    # rank 1 gets SIGTERM in the middle of step 2 (0-based): both ranks finish it, commit step 3, stop
    out = run_ranks(_loop_rank, 2, str(tmp_path), "spot", (*over, "method.sigterm_at_step=2", "method.sigterm_rank=1"),
                    "rank", 32)
    assert [o.get("preempted") for o in out] == [3, 3] and out[0]["reports"] == [3]
    ckpts = tmp_path / "spot" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000003"] and (ckpts / "step_00000003" / "COMMITTED").exists()
    out = run_ranks(_loop_rank, 2, str(tmp_path), "spot", over, "rank", 32)  # the restarted job
    assert [o["step"] for o in out] == [6, 6] and out[0]["reports"] == [6]
    assert [s["start_step"] for s in _sessions(tmp_path / "spot")] == [0, 3]
    assert _key_log(keys) == _expected_keys(32, 2, 6)  # no batch lost or repeated


def test_preemption_notice_commits_once_and_training_goes_on(dist_world1, tmp_path, monkeypatch):
    """The pool's notice (Ray Train: `get_preemption_info`) stays up once raised: one checkpoint at
    the next step boundary, then training continues (the pool restarts the run if the node goes)."""
    from cluster.job import TrainJob, WorkerContext
    from cluster.loop import train_loop
    from toy_method import MemoryReaderFactory, ToyImages, ToyMethod

    monkeypatch.setenv("CKPT_STAGE_DIR", str(tmp_path / "stage"))
    exp = _cfg(str(tmp_path), "notice", "deepspeed.zero_stage=2", "checkpoint.every_steps=100", "train.max_steps=5",
               "method.gan=false")
    job = TrainJob(method=ToyMethod, data=ToyImages().resolve(exp), source=MemoryReaderFactory(16), micro_batch_size=2)
    calls, reports = [], []

    def preempted() -> bool:
        calls.append(1)
        return len(calls) >= 2  # raised during step 2

    ctx = WorkerContext(0, 1, torch.device("cpu"), report=lambda m, url: reports.append(m["step"]), preempted=preempted)
    assert train_loop(exp, ctx, job)["step"] == 5
    assert reports == [2, 5] and len(calls) == 5
    assert sorted(p.name for p in (tmp_path / "notice" / "checkpoints").iterdir()) == ["step_00000002", "step_00000005"]
