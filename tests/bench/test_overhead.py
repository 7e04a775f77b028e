"""bench/overhead.py: the plain loop the overhead benches compare against does the rank loop's
arithmetic (same updates of every module, within float rounding), so their ratio measures the
distributed path only; and the in-memory source replays its batches from a saved position."""
from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "cluster")]

from bench.overhead import MemoryBatches, MemorySource, PlainLoop  # noqa: E402
from bench.train_overhead import BenchExperiment, BenchMethod, random_images  # noqa: E402
from system.config.load import load_config  # noqa: E402
from system.methods.base import DataSpec  # noqa: E402
from system.train_utils import seed_everything  # noqa: E402

STEPS = 4


def _exp(storage: str, zero: int) -> BenchExperiment:
    return load_config(BenchExperiment, [
        "run_name=plain-vs-rank", f"checkpoint.storage_path={storage}", "checkpoint.export=false", "data.url=unused",
        "data.resolution=8", "data.batch_size=4", "method.width=4", f"deepspeed.zero_stage={zero}",
        f"train.max_steps={STEPS}", "optim.warmup_steps=2", "optim.lr=1e-2", "optim.min_lr=1e-3", "optim.grad_clip=0.05",
        "logging.wandb_mode=disabled", "logging.progress=false", "train.sample_every=0"])


def _rank_loop(rank: int, world: int, storage: str, zero: int) -> dict:
    from cluster.job import WorkerContext
    from cluster.loop import RankLoop
    from cluster.training import resolve_job

    exp = _exp(storage, zero)
    job = resolve_job(exp, source=MemorySource(DataSpec(8, 1), partial(random_images, 8)))
    loop = RankLoop(exp, WorkerContext(rank, world, torch.device("cpu")), job)
    loop.run()
    return {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in loop.mods.items()}


def test_plain_loop_updates_the_modules_as_the_rank_loop_does(tmp_path, monkeypatch):
    from multirank import run_ranks

    monkeypatch.setenv("CKPT_STAGE_DIR", str(tmp_path / "stage"))
    exp = _exp(str(tmp_path), 2)
    seed_everything(exp.seed)  # the rank loop's model init
    loop = PlainLoop(BenchMethod(exp.method, DataSpec(8, 1)), exp.optim, exp.train.max_steps)
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in loop.mods.items()}
    it = iter(MemoryBatches(random_images(8, 4, exp.seed)))  # rank 0's batches
    for _ in range(STEPS):
        loop.step(next(it))
    (ranked,) = run_ranks(_rank_loop, 1, str(tmp_path), 2, env={"CKPT_STAGE_DIR": str(tmp_path / "stage")})
    assert set(ranked) == set(loop.mods) == {"gen", "disc"}
    for n, m in loop.mods.items():
        assert any(not torch.equal(v, before[n][k]) for k, v in m.state_dict().items()), f"{n} was not trained"
        for k, v in m.state_dict().items():
            torch.testing.assert_close(v, ranked[n][k], rtol=1e-4, atol=1e-6, msg=f"{n}.{k}")


def test_memory_batches_continue_from_a_saved_position():
    batches = random_images(4, 2, seed=0)
    a = MemoryBatches(batches)
    it = iter(a)
    next(it), next(it)
    b = MemoryBatches(batches)
    b.load_state_dict(a.state_dict())
    assert torch.equal(next(iter(b))["image"], next(it)["image"])
