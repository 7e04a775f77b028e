"""Shared by the overhead benchmarks (bench/train_overhead.py: GAN autoencoder, bench/ar_overhead.py:
AR on tokens): the same model and global batch trained through Ray Train + DeepSpeed (the one rank
loop via cluster.training.run_training) and in a plain single-process PyTorch loop, timed alike.

Both sides report seconds per step of each `warmup`-step window after a `warmup`-step warm-up (the
rank loop logs every `warmup` steps; the plain loop marks the same windows), summarised by the median
window (robust to a busy neighbour on a shared machine; the mean over all timed steps beside it). The
baseline is the best plain loop seen (1 thread or one per worker; the better of a run before and one
after the distributed run), so the ratio stays conservative.

The plain loop is `PlainLoop`: the rank loop's arithmetic (same method, optimizer groups, LR
schedule, frozen modules, clipping, EMA) without DeepSpeed or Ray, so the ratio measures the
distributed path only; bench/tiny_recipe.py trains with it too. Data comes from memory on both
sides (`MemorySource`) unless a bench reads shards.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any, Callable

import torch

from system.config import OptimConfig
from system.data.source import BatchSource
from system.data.sources import DataSpec
from system.methods.base import Method, StepOutput, frozen
from system.train_utils import EMA, lr_factor


class MemoryBatches(BatchSource):
    """Endless batches from memory (`batches` in turn: no decode cost), with the batch-source state API."""

    def __init__(self, batches: list[dict]):
        self.batches, self.i = batches, 0

    def __iter__(self):
        while True:
            self.i += 1
            yield self.batches[self.i % len(self.batches)]

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = int(state["i"])


class MemorySource:
    """A `SourceFactory` (system/data/sources.py) of in-memory batches: `make(batch_size, seed)` gives
    a rank's list of batches (seed: `exp.seed` + rank); nothing to check, no validation split.
    `make` must pickle (a module-level function or a partial of one): it travels to every rank."""

    def __init__(self, data: DataSpec, make: Callable[[int, int], list[dict]]):
        self.data, self.make = data, make

    def check(self, exp) -> None:
        pass

    def resolve(self, exp) -> DataSpec:
        return self.data

    def __call__(self, exp, ctx) -> MemoryBatches:
        return MemoryBatches(self.make(exp.data.batch_size, exp.seed + ctx.rank))

    def validation(self, exp, ctx) -> None:
        return None


class PlainLoop:
    """The rank loop's arithmetic (cluster/loop.py) in one process without DeepSpeed or Ray: AdamW per
    module on the engine's parameter groups (decay on matrices only; a module's own lr, betas and
    weight decay), the LR schedule, each phase with the other modules frozen, gradient clipping, the
    modules' EMAs with the loop's warm-up. One micro-batch per step (`optim.grad_accum` 1)."""

    def __init__(self, method: Method, optim: OptimConfig, max_steps: int, ema_every: int = 1):
        from cluster.engine import param_groups  # the engine's groups (imports DeepSpeed)

        if optim.grad_accum != 1:
            raise ValueError(f"PlainLoop runs one micro-batch per step; optim.grad_accum = {optim.grad_accum}")
        specs = method.modules()
        self.method, self.optim, self.max_steps, self.ema_every, self.steps = method, optim, max_steps, ema_every, 0
        self.mods = {n: s.module.train() for n, s in specs.items()}
        self.base_lr = {n: s.lr if s.lr is not None else optim.lr for n, s in specs.items()}
        self.opts = {n: torch.optim.AdamW(param_groups(s.module, optim.weight_decay if s.weight_decay is None else s.weight_decay),
                                          lr=self.base_lr[n], betas=tuple(s.betas or optim.betas), eps=optim.eps)
                     for n, s in specs.items()}
        self.emas = {n: EMA(dict(s.module.named_parameters()), s.ema_decay) for n, s in specs.items() if s.ema_decay > 0}

    def step(self, batch: Any) -> dict[str, StepOutput]:
        """One optimizer step of every phase on `batch`; returns each phase's output."""
        o, s = self.optim, self.steps
        f = lr_factor(s, warmup_steps=o.warmup_steps, max_steps=self.max_steps, min_ratio=o.min_lr / o.lr, schedule=o.schedule)
        carry: dict = {}
        outs: dict[str, StepOutput] = {}
        for phase in self.method.phases():
            opt, module = self.opts[phase], self.mods[phase]
            for g in opt.param_groups:
                g["lr"] = self.base_lr[phase] * f
            with frozen(*(m for n, m in self.mods.items() if n != phase)):
                out = self.method.step(phase, self.mods, batch, s, carry)
            out.loss.backward()
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(module.parameters(), o.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            carry.update(out.aux)
            outs[phase] = out
        self.steps += 1
        if self.steps % self.ema_every == 0:
            for n, ema in self.emas.items():
                ema.update(dict(self.mods[n].named_parameters()), ema.warmup_decay(self.steps))
        return outs


def parse_args(doc: str, add: Callable[[argparse.ArgumentParser], None]) -> argparse.Namespace:
    """The shared flags (--workers, --global-batch, --steps, --warmup, --zero) plus the script's own
    (`add`), checked: --steps a multiple of --warmup, --global-batch divisible by --workers."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    add(ap)
    a = ap.parse_args()
    if a.warmup < 1 or a.steps % a.warmup:
        raise SystemExit(f"--steps {a.steps} must be a multiple of --warmup {a.warmup} (>= 1): both sides time windows of --warmup steps")
    if a.global_batch % a.workers:
        raise SystemExit(f"--global-batch {a.global_batch} must be divisible by --workers {a.workers}")
    return a


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def plain_windows(step: Callable[[int], None], steps: int, warmup: int, threads: int) -> list[float]:
    """Seconds per step of each `warmup`-step window of `step(i)` after `warmup` warm-up steps, on
    `threads` intra-op threads."""
    torch.set_num_threads(threads)
    marks: list[float] = []  # time at the start of step `warmup` and at the end of every later step
    for i in range(warmup + steps):
        if i == warmup:
            marks.append(time.perf_counter())
        step(i)
        if i >= warmup:
            marks.append(time.perf_counter())
    return [(marks[j + warmup] - marks[j]) / warmup for j in range(0, steps, warmup)]


def bench_config_args(workers: int, steps: int, warmup: int, zero: int, storage: str) -> list[str]:
    """`key=value` settings every distributed side shares: N CPU workers, data read in the rank's own
    process (no DataLoader processes: the data comes from memory, and a CPU machine with one core per
    worker has none to spare), no checkpoints or export during the run, logs every `warmup` steps."""
    return [
        "run_name=overhead", f"cluster.num_workers={workers}", "cluster.device=cpu",
        f"cluster.local_num_cpus={max(workers, os.cpu_count() or 1)}", "cluster.max_failures=0", "data.num_workers=0",
        f"checkpoint.storage_path={storage}", f"checkpoint.every_steps={10**9}", "checkpoint.export=false",
        f"train.max_steps={warmup + steps}", f"deepspeed.zero_stage={zero}", "logging.wandb_mode=disabled",
        "logging.progress=false", f"logging.log_every={warmup}", "optim.warmup_steps=0",
    ]


def distributed_windows(build: Callable[[str], tuple[Any, Any]], batch: int, warmup: int) -> list[float]:
    """Seconds per step through Ray Train + DeepSpeed: `build(storage)` -> (experiment, TrainJob), run
    with `run_training`; one value per logged window after the first (warm-up)."""
    import ray

    from cluster.training import run_training

    with tempfile.TemporaryDirectory() as d:
        exp, job = build(d)
        run_training(exp, job)
        rows = [json.loads(x) for x in open(os.path.join(d, exp.run_name, "metrics.jsonl"))]
    ray.shutdown()
    return [batch / r["images_per_s"] for r in rows if r["step"] > warmup]


def compare(plain: Callable[[int], list[float]], distributed: Callable[[], list[float]], *, workers: int, zero: int,
            per_step: float, unit: str, model: str, steps: int, warmup: int, goal: float = 0.8) -> dict:
    """Run plain (1 thread and one per worker), distributed, then the best plain again; print steps/s
    and `unit`/s (`per_step` units per step) of each, the ratio and the load average; return them."""
    load0 = os.getloadavg()
    runs = {t: plain(t) for t in sorted({1, workers})}
    dist = distributed()
    best_t = min(runs, key=lambda t: median(runs[t]))
    runs[best_t] = min(runs[best_t], plain(best_t), key=median)
    load1 = os.getloadavg()
    print(f"model: {model}, {steps} timed steps (median of {warmup}-step windows after {warmup} warm-up steps; "
          "mean over all timed steps in brackets)")
    for t, xs in runs.items():
        print(f"plain PyTorch, 1 process x {t} thread(s)  : {1 / median(xs):7.2f} steps/s  {per_step / median(xs):10.1f} "
              f"{unit}/s  ({per_step / mean(xs):.1f})")
    print(f"Ray Train + DeepSpeed ZeRO-{zero}, {workers} workers : {1 / median(dist):7.2f} steps/s  "
          f"{per_step / median(dist):10.1f} {unit}/s  ({per_step / mean(dist):.1f})")
    best = min(runs.values(), key=median)
    ratio, ratio_mean = median(best) / median(dist), mean(best) / mean(dist)
    print(f"ratio (distributed / best plain, per {unit.rstrip('s')}): {ratio:.2f}x  (goal >= {goal}x)  (by means: {ratio_mean:.2f}x)")
    print("load average 1/5/15 min: at start " + " ".join(f"{x:.2f}" for x in load0) + ", at end " +
          " ".join(f"{x:.2f}" for x in load1))
    return {"ratio": ratio, "ratio_mean": ratio_mean, "plain": {t: per_step / median(x) for t, x in runs.items()},
            "distributed": per_step / median(dist), "load": [load0, load1]}
