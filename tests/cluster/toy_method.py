"""A tiny method on the `Method` contract for tests and benchmarks of cluster/, registered through
the registry alone (no edit under cluster/): a conv autoencoder generator (with dropout and input
noise, so RNG restore matters) and a conv discriminator trained with a hinge loss. Optionally logs
the sample keys of each step. Plus an in-memory batch source."""
from __future__ import annotations

import json
import os
import signal
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dataclasses import dataclass, field

from system.config import Experiment
from system.data.source import BatchSource
from system.data.sources import ImageShards, SourceContext
from system.methods.base import DataSpec, Method, ModuleSpec, StepOutput
from system.methods.registry import register
from system.models.artifacts import Artifact


class ToyGenerator(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.GroupNorm(2, width), nn.SiLU(), nn.Conv2d(width, width, 3, 1, 1))
        self.decoder = nn.Sequential(nn.Dropout(0.1), nn.ConvTranspose2d(width, width, 4, 2, 1), nn.SiLU(), nn.Conv2d(width, 3, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 3, H, W)
        return self.decoder(self.encoder(x))


class ToyDiscriminator(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(width, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 1, H/2, W/2) logits
        return self.net(x)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


@dataclass
class ToyConfig:
    """The toy two-phase method's `method:` section."""

    width: int = 8
    gan: bool = True
    gan_weight: float = 0.1
    ema_decay: float = 0.9
    key_log: Optional[str] = None  # folder: each rank appends the sample keys of each step
    sigterm_at_step: Optional[int] = None  # test hook: rank `sigterm_rank` sends itself SIGTERM in this step
    sigterm_rank: int = 0


@dataclass
class ToyExperiment(Experiment):
    method: ToyConfig = field(default_factory=ToyConfig)


class ToyMethod(Method):
    """Two phases ("gen" then "disc", or "gen" alone with gan=false): a conv autoencoder with a
    hinge-GAN discriminator; keeps a call counter as per-rank method state."""

    def __init__(self, cfg: ToyConfig, data: DataSpec):
        super().__init__(cfg, data)
        self.calls = 0

    def modules(self) -> dict[str, ModuleSpec]:
        out = {"gen": ModuleSpec(ToyGenerator(self.cfg.width), ema_decay=self.cfg.ema_decay)}
        if self.cfg.gan:
            out["disc"] = ModuleSpec(ToyDiscriminator(self.cfg.width), lr=0.005, betas=(0.5, 0.9))
        return out

    def phases(self) -> list[str]:
        return ["gen", "disc"] if self.cfg.gan else ["gen"]

    def step(self, phase, mods, batch, step, carry):
        if phase == "disc":
            real, fake = mods["disc"](batch["image"]).float(), mods["disc"](carry["rec"]).float()
            loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
            return StepOutput(loss=loss, metrics={"real_logit": real.mean().detach()})
        x = batch["image"]
        if step == self.cfg.sigterm_at_step and _rank() == self.cfg.sigterm_rank:
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. a spot node's notice, in the middle of a step
        if self.cfg.key_log:
            os.makedirs(self.cfg.key_log, exist_ok=True)
            with open(os.path.join(self.cfg.key_log, f"keys_rank{_rank()}.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "keys": list(batch["key"])}) + "\n")
        rec = mods["gen"](x + 0.01 * torch.randn_like(x))
        mse = F.mse_loss(rec.float(), x)
        loss, metrics = mse, {"mse": mse.detach()}
        if "disc" in mods:
            g = -mods["disc"](rec).float().mean()
            loss = loss + self.cfg.gan_weight * g
            metrics["gan_g"] = g.detach()
        self.calls += 1
        return StepOutput(loss=loss, metrics=metrics, aux={"rec": rec.detach()})

    @torch.no_grad()
    def sample_images(self, mods, batch, seed):
        x = batch["image"]
        return {"original": x, "reconstruction": mods["gen"](x).float().clamp(-1, 1)}

    def artifacts(self, mods):
        g = mods["gen"]
        return {"encoder": Artifact("toy", {"width": self.cfg.width}, g.encoder.state_dict()),
                "decoder": Artifact("toy", {"width": self.cfg.width}, g.decoder.state_dict())}

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])


class ToyImages(ImageShards):
    """Image shards, one class whatever the index says (the toys are unconditional)."""

    def resolve(self, exp) -> DataSpec:
        return DataSpec(resolution=exp.data.resolution, num_classes=1)


register("toy", ToyConfig, ToyMethod, source=ToyImages())


@dataclass
class ToyOneConfig:
    """The toy one-phase method's section."""

    hidden: int = 4


@dataclass
class ToyOneExperiment(Experiment):
    method: ToyOneConfig = field(default_factory=ToyOneConfig)


class ToyOnePhase(Method):
    """One phase ("fit"): a tiny MLP predicting each image's mean colour from its pixels, with
    dropout (RNG restore matters) and no EMA, no sample grid (the defaults of the contract)."""

    def modules(self) -> dict[str, ModuleSpec]:
        r = self.data.resolution
        net = nn.Sequential(nn.Flatten(), nn.Linear(3 * r * r, self.cfg.hidden), nn.Dropout(0.2), nn.Linear(self.cfg.hidden, 3))
        return {"net": ModuleSpec(net)}

    def phases(self) -> list[str]:
        return ["net"]

    def step(self, phase, mods, batch, step, carry):
        x = batch["image"]
        err = F.mse_loss(mods["net"](x).float(), x.mean(dim=(2, 3)))
        return StepOutput(loss=err, metrics={"err": err.detach()})

    def artifacts(self, mods):
        return {"net": Artifact("toy-mlp", {"hidden": self.cfg.hidden}, mods["net"].state_dict())}


register("toy1", ToyOneConfig, ToyOnePhase, source=ToyImages())


class MemoryReader(BatchSource):
    """In-memory stand-in with the ShardReader API: `n` deterministic images, a per-epoch
    permutation seeded by (seed, epoch), rank r reads every world_size-th sample."""

    def __init__(self, n: int, *, rank: int, world_size: int, batch_size: int, resolution: int, seed: int = 0):
        g = torch.Generator().manual_seed(1234)
        self.images = torch.rand(n, 3, resolution, resolution, generator=g) * 2 - 1
        self.n, self.rank, self.world, self.bs, self.seed = n, rank, world_size, batch_size, seed
        self.epoch, self.pos = 0, 0

    def _order(self, epoch: int) -> list[int]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)).tolist()
        return perm[self.rank :: self.world]

    def __iter__(self):
        while True:
            order = self._order(self.epoch)
            if self.pos + self.bs > len(order):
                self.epoch, self.pos = self.epoch + 1, 0
                continue
            idx = order[self.pos : self.pos + self.bs]
            self.pos += self.bs
            yield {"image": self.images[idx], "label": torch.zeros(len(idx), dtype=torch.long), "key": [f"s{i:05d}" for i in idx]}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


class MemoryReaderFactory(ToyImages):
    """Picklable batch-source factory: a `MemoryReader` of `n` images for each rank (no data set to
    check; no validation split)."""

    def check(self, exp) -> None:
        pass

    def validation(self, exp, ctx: SourceContext) -> None:
        return None

    def __init__(self, n: int = 64):
        self.n = n

    def __call__(self, exp, ctx: SourceContext) -> MemoryReader:
        return MemoryReader(self.n, rank=ctx.rank, world_size=ctx.world_size, batch_size=exp.data.batch_size,
                            resolution=exp.data.resolution, seed=exp.seed)


class GlobalMemoryReader(MemoryReader):
    """`MemoryReader` dealt by samples with a world-size independent position (the contract of the
    shard readers): each step the ranks together take the next `world_size * batch_size` positions
    of the epoch's permutation, rank r the r-th batch of them; the state (epoch, positions consumed)
    is the same on every rank and loads at any world size. An epoch ends when fewer positions than
    one step's remain (they are dropped)."""

    def __iter__(self):
        while True:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch)).tolist()
            if self.pos + self.world * self.bs > self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                continue
            idx = order[self.pos + self.rank * self.bs : self.pos + (self.rank + 1) * self.bs]
            self.pos += self.world * self.bs
            yield {"image": self.images[idx], "label": torch.zeros(len(idx), dtype=torch.long), "key": [f"s{i:05d}" for i in idx]}


class GlobalMemoryReaderFactory(MemoryReaderFactory):
    """Picklable factory of `GlobalMemoryReader`s."""

    def __call__(self, exp, ctx: SourceContext) -> GlobalMemoryReader:
        return GlobalMemoryReader(self.n, rank=ctx.rank, world_size=ctx.world_size, batch_size=exp.data.batch_size,
                                  resolution=exp.data.resolution, seed=exp.seed)


class RefusingFactory(MemoryReaderFactory):
    """A batch source every rank refuses with a ConfigError (e.g. data that a restart would find as
    bad); each call appends the rank to `<folder>/calls`."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, exp, ctx: SourceContext) -> MemoryReader:
        from system.config import ConfigError

        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, "calls"), "a") as f:
            f.write(f"{ctx.rank}\n")
        raise ConfigError(f"config key 'data.url': refused on rank {ctx.rank}")
