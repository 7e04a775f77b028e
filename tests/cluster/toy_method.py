"""A tiny method implementing the `Method` protocol for tests and benchmarks of cluster/:
a conv autoencoder generator (with dropout and input noise, so RNG restore matters) and a
conv discriminator trained with a hinge loss. Optionally logs the sample keys of each step."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from system.methods.base import StepOutput


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


class ToyMethod:
    def __init__(self, width: int = 8, gan: bool = True, gan_weight: float = 0.1, key_log: Optional[str] = None):
        self.width, self.gan, self.gan_weight, self.key_log = width, gan, gan_weight, key_log
        self.calls = 0

    def build_generator(self) -> nn.Module:
        return ToyGenerator(self.width)

    def build_discriminator(self) -> Optional[nn.Module]:
        return ToyDiscriminator(self.width) if self.gan else None

    def to(self, device: torch.device) -> "ToyMethod":
        return self

    def generator_step(self, gen, disc, batch, step):
        x = batch["image"]
        if self.key_log:
            os.makedirs(self.key_log, exist_ok=True)
            with open(os.path.join(self.key_log, f"keys_rank{_rank()}.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "keys": list(batch["key"])}) + "\n")
        rec = gen(x + 0.01 * torch.randn_like(x))
        mse = F.mse_loss(rec.float(), x)
        loss = mse
        metrics = {"mse": float(mse.detach())}
        if disc is not None:
            g = -disc(rec).float().mean()
            loss = loss + self.gan_weight * g
            metrics["gan_g"] = float(g.detach())
        self.calls += 1
        return StepOutput(loss=loss, metrics=metrics, aux={"rec": rec.detach()})

    def discriminator_step(self, disc, batch, aux, step):
        real, fake = disc(batch["image"]).float(), disc(aux["rec"]).float()
        loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        return StepOutput(loss=loss, metrics={"real_logit": float(real.mean().detach())})

    @torch.no_grad()
    def sample_images(self, gen, batch, seed):
        x = batch["image"]
        return {"original": x, "reconstruction": gen(x).float().clamp(-1, 1)}

    def export(self, gen):
        return {"encoder": gen.encoder.state_dict(), "decoder": gen.decoder.state_dict()}

    # optional hooks: method state that a checkpoint keeps
    def train_state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_train_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])


class ToyFactory:
    """Picklable `method_factory(cfg) -> ToyMethod`."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def __call__(self, cfg) -> ToyMethod:
        return ToyMethod(**self.kwargs)


class MemoryReader:
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


class MemoryReaderFactory:
    """Picklable `reader_factory(cfg, rank, world_size)`."""

    def __init__(self, n: int = 64):
        self.n = n

    def __call__(self, cfg, rank: int, world_size: int) -> MemoryReader:
        return MemoryReader(self.n, rank=rank, world_size=world_size, batch_size=cfg.data.batch_size,
                            resolution=cfg.data.resolution, seed=cfg.seed)
