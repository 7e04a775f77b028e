"""Overhead of the distributed path: the same tiny GAN autoencoder and global batch trained
(a) through Ray Train + DeepSpeed (the one rank loop via cluster.training.run_training, N CPU
workers, gloo) and
(b) in a plain single-process PyTorch loop (bench/overhead.py's `PlainLoop`: the same AdamW groups,
LR schedule, frozen modules, clipping and alternating G/D steps),
in one run. Data is in memory on both sides, so only training throughput is compared.

    python bench/train_overhead.py [--workers 2] [--global-batch 32] [--steps 60] [--zero 2]

Prints steps/s and samples/s of both and their ratio (goal on CPU: >= 0.8x per sample), both sides
timed alike (bench/overhead.py): the median of --warmup-step windows after --warmup warm-up steps,
with the load average (the machine may be shared: quote the load with the figures).
"""
from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from dataclasses import dataclass, field  # noqa: E402

from system.config import Experiment  # noqa: E402
from system.methods.base import DataSpec, Method, ModuleSpec, StepOutput  # noqa: E402
from system.methods.registry import register  # noqa: E402
from system.models.artifacts import Artifact  # noqa: E402

from bench.overhead import (MemoryBatches, MemorySource, PlainLoop, bench_config_args, compare,  # noqa: E402
                            distributed_windows, parse_args, plain_windows)


class Gen(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, w, 3, 2, 1), nn.SiLU(), nn.Conv2d(w, w, 3, 1, 1), nn.SiLU(), nn.Conv2d(w, w, 3, 1, 1))
        self.dec = nn.Sequential(nn.ConvTranspose2d(w, w, 4, 2, 1), nn.SiLU(), nn.Conv2d(w, w, 3, 1, 1), nn.SiLU(), nn.Conv2d(w, 3, 3, 1, 1))

    def forward(self, x):  # (B, 3, R, R) -> (B, 3, R, R)
        return self.dec(self.enc(x))


class Disc(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(w, w, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(w, 1, 3, 1, 1))

    def forward(self, x):  # (B, 3, R, R) -> (B, 1, R/4, R/4)
        return self.net(x)


@dataclass
class BenchConfig:
    width: int = 32


@dataclass
class BenchExperiment(Experiment):
    method: BenchConfig = field(default_factory=BenchConfig)


class BenchMethod(Method):
    """Two phases (gen, disc) on the one contract; registered under "bench-gan"."""

    def modules(self) -> dict[str, ModuleSpec]:
        return {"gen": ModuleSpec(Gen(self.cfg.width)), "disc": ModuleSpec(Disc(self.cfg.width), betas=(0.5, 0.9))}

    def phases(self) -> list[str]:
        return ["gen", "disc"]

    def step(self, phase, mods, batch, step, carry):
        x = batch["image"]
        if phase == "disc":
            d = mods["disc"]
            return StepOutput(loss=F.relu(1 - d(x)).mean() + F.relu(1 + d(carry["rec"])).mean())
        rec = mods["gen"](x)
        loss = F.mse_loss(rec, x) - 0.1 * mods["disc"](rec).mean()
        return StepOutput(loss=loss, aux={"rec": rec.detach()})

    def artifacts(self, mods):
        return {"gen": Artifact("bench", {"width": self.cfg.width}, mods["gen"].state_dict())}


register("bench-gan", BenchConfig, BenchMethod)


def random_images(res: int, batch: int, seed: int) -> list[dict]:
    """16 fixed batches of random images in [-1, 1] (a rank's in-memory data)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(16, batch, 3, res, res, generator=g) * 2 - 1
    return [{"image": x, "label": torch.zeros(batch, dtype=torch.long), "key": []} for x in images]


def experiment(a, storage: str, workers: int) -> BenchExperiment:
    """The run's config (the plain loop reads its optimizer settings from it too)."""
    from system.config.load import load_config

    return load_config(BenchExperiment, [*bench_config_args(workers, a.steps, a.warmup, a.zero, storage), "data.url=unused",
                                         f"data.resolution={a.resolution}", f"data.batch_size={a.global_batch // workers}",
                                         f"method.width={a.width}"])


def plain_loop(a, threads: int) -> list[float]:
    """Seconds per step of the rank loop's arithmetic in one process on the global batch, one value
    per `warmup`-step window after the warm-up (the windows the rank loop logs on the other side)."""
    torch.manual_seed(0)
    exp = experiment(a, "unused", 1)
    loop = PlainLoop(BenchMethod(exp.method, DataSpec(a.resolution, 1)), exp.optim, exp.train.max_steps)
    it = iter(MemoryBatches(random_images(a.resolution, a.global_batch, 0)))
    return plain_windows(lambda i: loop.step(next(it)), a.steps, a.warmup, threads)


def distributed(a) -> list[float]:
    """Seconds per step through Ray Train + DeepSpeed, one value per logged `warmup`-step window after
    the warm-up (the loop logs every `warmup` steps)."""
    from cluster.training import resolve_job

    def build(storage: str):
        exp = experiment(a, storage, a.workers)
        return exp, resolve_job(exp, source=MemorySource(DataSpec(a.resolution, 1), partial(random_images, a.resolution)))

    return distributed_windows(build, a.global_batch, a.warmup)


def main() -> None:
    def add(ap) -> None:
        ap.add_argument("--resolution", type=int, default=32)
        ap.add_argument("--width", type=int, default=32)

    a = parse_args(__doc__, add)
    compare(lambda t: plain_loop(a, t), lambda: distributed(a),
            workers=a.workers, zero=a.zero, per_step=a.global_batch, unit="samples", steps=a.steps, warmup=a.warmup,
            model=f"conv GAN autoencoder width {a.width}, {a.resolution}px, global batch {a.global_batch}")


if __name__ == "__main__":
    main()
