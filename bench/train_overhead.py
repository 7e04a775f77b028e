"""Overhead of the distributed path: the same tiny GAN autoencoder and global batch trained
(a) through Ray Train + DeepSpeed (the one rank loop via cluster.train_pool.run_training, N CPU
workers, gloo) and
(b) in a plain single-process PyTorch loop (AdamW, grad clipping, same alternating G/D steps),
in one run. Data is in memory on both sides, so only training throughput is compared.

    python bench/train_overhead.py [--workers 2] [--global-batch 32] [--steps 60] [--zero 2]

Prints steps/s and samples/s of both and their ratio (goal on CPU: >= 0.8x per sample), both sides
timed alike (bench/overhead.py): the median of --warmup-step windows after --warmup warm-up steps,
with the load average (the machine may be shared: quote the load with the figures).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from dataclasses import dataclass, field  # noqa: E402

from system.config import Experiment  # noqa: E402
from system.data.source import BatchSource  # noqa: E402
from system.data.sources import ImageShards  # noqa: E402
from system.methods.base import DataSpec, Method, ModuleSpec, StepOutput  # noqa: E402
from system.methods.registry import register  # noqa: E402
from system.models.artifacts import Artifact  # noqa: E402

from bench.overhead import bench_config_args, compare, distributed_windows, parse_args, plain_windows  # noqa: E402


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


class RandomReader(BatchSource):
    """Endless in-memory batches (no decode cost), with the batch-source state API."""

    def __init__(self, batch: int, res: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(16, batch, 3, res, res, generator=g) * 2 - 1
        self.i = 0

    def __iter__(self):
        while True:
            self.i += 1
            yield {"image": self.images[self.i % len(self.images)], "label": torch.zeros(len(self.images[0]), dtype=torch.long), "key": []}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = int(s["i"])


class ReaderFactory(ImageShards):
    """The bench's data: random in-memory images (nothing to check or validate)."""

    def check(self, exp) -> None:
        pass

    def resolve(self, exp) -> DataSpec:
        return DataSpec(exp.data.resolution, 1)

    def __call__(self, exp, ctx):
        return RandomReader(exp.data.batch_size, exp.data.resolution, exp.seed + ctx.rank)

    def validation(self, exp, ctx):
        return None


def plain_loop(width: int, batch: int, res: int, steps: int, warmup: int, threads: int) -> list[float]:
    """Seconds per step of a single-process loop doing the same work on the global batch, one value
    per `warmup`-step window after the warm-up (the windows the rank loop logs on the other side)."""
    torch.manual_seed(0)
    m = BenchMethod(BenchConfig(width), DataSpec(res, 1))
    mods = {n: spec.module for n, spec in m.modules().items()}
    gen, disc = mods["gen"], mods["disc"]
    og = torch.optim.AdamW(gen.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    od = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.5, 0.9), weight_decay=0.05)
    it = iter(RandomReader(batch, res, 0))

    def step(i: int) -> None:
        b = next(it)
        for p in disc.parameters():
            p.requires_grad_(False)
        out = m.step("gen", mods, b, i, {})
        out.loss.backward()
        for p in disc.parameters():
            p.requires_grad_(True)
        torch.nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
        og.step()
        og.zero_grad(set_to_none=True)
        d = m.step("disc", mods, b, i, out.aux)
        d.loss.backward()
        torch.nn.utils.clip_grad_norm_(disc.parameters(), 1.0)
        od.step()
        od.zero_grad(set_to_none=True)

    return plain_windows(step, steps, warmup, threads)


def distributed(width: int, batch: int, res: int, steps: int, warmup: int, workers: int, zero: int) -> list[float]:
    """Seconds per step through Ray Train + DeepSpeed, one value per logged `warmup`-step window after
    the warm-up (the loop logs every `warmup` steps)."""
    from cluster.training import resolve_job
    from system.config.load import load_config

    def build(storage: str):
        cfg = load_config(BenchExperiment, [*bench_config_args(workers, steps, warmup, zero, storage), "data.url=unused",
                                            f"data.resolution={res}", f"data.batch_size={batch // workers}",
                                            f"method.width={width}"])
        return cfg, resolve_job(cfg, source=ReaderFactory())

    return distributed_windows(build, batch, warmup)


def main() -> None:
    def add(ap) -> None:
        ap.add_argument("--resolution", type=int, default=32)
        ap.add_argument("--width", type=int, default=32)

    a = parse_args(__doc__, add)
    compare(lambda t: plain_loop(a.width, a.global_batch, a.resolution, a.steps, a.warmup, t),
            lambda: distributed(a.width, a.global_batch, a.resolution, a.steps, a.warmup, a.workers, a.zero),
            workers=a.workers, zero=a.zero, per_step=a.global_batch, unit="samples", steps=a.steps, warmup=a.warmup,
            model=f"conv GAN autoencoder width {a.width}, {a.resolution}px, global batch {a.global_batch}")


if __name__ == "__main__":
    main()
