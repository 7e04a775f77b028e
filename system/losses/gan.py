"""PatchGAN discriminator, hinge losses, LeCam regularisation and the VQGAN adaptive weight.

Norm choice: GroupNorm is the default. BatchNorm statistics differ per rank (no SyncBN in a
library free of process-group code), depend on the per-GPU batch size, and are computed
separately on the real and the fake batch (a known leak in the taming discriminator).
GroupNorm has none of these problems and no running buffers to checkpoint. ``norm="batch"``
keeps the taming layout for loading its checkpoints; ``norm="none"`` drops normalisation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

NormKind = Literal["group", "batch", "none"]


@dataclass
class DiscriminatorConfig:
    in_channels: int = 3
    ndf: int = 64
    n_layers: int = 3
    norm: NormKind = "group"
    num_groups: int = 32


def _norm(kind: NormKind, channels: int, num_groups: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(num_groups, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"DiscriminatorConfig.norm={kind!r}; expected 'group', 'batch' or 'none'")


class PatchDiscriminator(nn.Module):
    """taming-style NLayerDiscriminator: (B,C,H,W) -> (B,1,H',W') patch logits (30x30 at 256px)."""

    def __init__(self, cfg: DiscriminatorConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or DiscriminatorConfig()
        if cfg.n_layers < 1:
            raise ValueError(f"DiscriminatorConfig.n_layers={cfg.n_layers}; expected >= 1")
        use_bias = cfg.norm != "batch"  # a BatchNorm after the conv makes its bias redundant
        layers: list[nn.Module] = [
            nn.Conv2d(cfg.in_channels, cfg.ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        mult = 1
        for n in range(1, cfg.n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < cfg.n_layers else 1
            layers += [
                nn.Conv2d(cfg.ndf * prev, cfg.ndf * mult, 4, stride=stride, padding=1, bias=use_bias),
                _norm(cfg.norm, cfg.ndf * mult, cfg.num_groups),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(cfg.ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,C,H,W) -> (B,1,H',W')
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z))]."""
    return -logits_fake.mean()


class LeCamEMA(nn.Module):
    """LeCam regulariser (Tseng et al. 2021) with EMAs of the mean real/fake logits.

    ``penalty`` = E[relu(D(x) - a_fake)^2] + E[relu(a_real - D(G(z)))^2] (the authors' code form,
    the paper's formula without the relu). EMAs are buffers, so they are checkpointed.
    """

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCamEMA.decay={decay}; expected 0 <= decay < 1")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        d = self.decay
        self.ema_real.mul_(d).add_((1 - d) * logits_real.detach().float().mean())
        self.ema_fake.mul_(d).add_((1 - d) * logits_fake.detach().float().mean())

    def penalty(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        return (
            F.relu(logits_real.float() - self.ema_fake).pow(2).mean()
            + F.relu(self.ema_real - logits_fake.float()).pow(2).mean()
        )

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor, update: bool = True) -> torch.Tensor:
        """Update the EMAs (optionally) then return the penalty for these logits."""
        if update:
            self.update(logits_real, logits_fake)
        return self.penalty(logits_real, logits_fake)


def adaptive_gan_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """VQGAN balance: ||d nll / d w|| / (||d g / d w|| + eps), clamped to [0, max_weight], detached.

    ``last_layer`` is the decoder's final weight tensor; both losses must depend on it. Keeps
    the graph (retain_graph) so the caller can still backpropagate the total loss.
    """
    if not last_layer.requires_grad:
        raise ValueError("adaptive_gan_weight: last_layer does not require grad; pass the decoder's trainable last weight")
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = nll_grad.float().norm() / (g_grad.float().norm() + eps)
    return w.clamp(0.0, max_weight).detach()


def gan_start_factor(step: int, gan_start_step: int) -> float:
    """1.0 once ``step >= gan_start_step`` else 0.0 (warm-up before the GAN term switches on)."""
    return 1.0 if step >= gan_start_step else 0.0


@dataclass
class GANLossConfig:
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    weight: float = 0.1  # lambda for the generator hinge term
    lecam_weight: float = 0.0  # EOSTok uses 0.05
    lecam_decay: float = 0.999
    adaptive: bool = False  # VQGAN adaptive weight (needs the decoder's last layer)
    gan_start_step: int = 0


class GANLoss(nn.Module):
    """Discriminator + LeCam EMA + generator/discriminator hinge terms with warm-up."""

    def __init__(self, cfg: GANLossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or GANLossConfig()
        self.disc = PatchDiscriminator(self.cfg.disc)
        self.lecam = LeCamEMA(self.cfg.lecam_decay)

    def generator_loss(
        self,
        fake: torch.Tensor,
        step: int,
        nll_loss: torch.Tensor | None = None,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted generator term for reconstructions ``fake`` (B,C,H,W); zero before the start step."""
        factor = gan_start_factor(step, self.cfg.gan_start_step)
        if factor == 0.0:  # warm-up: skip the discriminator forward entirely
            zero = fake.new_zeros((), dtype=torch.float32)
            return zero, {"gan/g_loss": zero, "gan/g_weight": zero}
        g = hinge_g_loss(self.disc(fake))
        weight = torch.tensor(self.cfg.weight, device=fake.device)
        if self.cfg.adaptive and torch.is_grad_enabled():
            if nll_loss is None or last_layer is None:
                raise ValueError("GANLoss.generator_loss: adaptive=True needs nll_loss and last_layer")
            weight = weight * adaptive_gan_weight(nll_loss, g, last_layer)
        loss = weight * g
        return loss, {"gan/g_loss": g.detach(), "gan/g_weight": weight.detach()}

    def discriminator_loss(
        self, real: torch.Tensor, fake: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge D loss (+ LeCam) on real images and detached reconstructions; zero before the start step.

        Before the start step the forward still runs (loss x 0) so every D parameter gets a
        (zero) gradient and the optimiser/engine sees the same graph each step.
        """
        factor = gan_start_factor(step, self.cfg.gan_start_step)
        logits_real = self.disc(real.detach())
        logits_fake = self.disc(fake.detach())
        d = hinge_d_loss(logits_real, logits_fake)
        loss = d
        metrics = {
            "gan/d_loss": d.detach(),
            "gan/logits_real": logits_real.detach().mean(),
            "gan/logits_fake": logits_fake.detach().mean(),
        }
        if self.cfg.lecam_weight > 0.0:
            reg = self.lecam(logits_real, logits_fake, update=self.training)
            loss = loss + self.cfg.lecam_weight * reg
            metrics["gan/lecam"] = reg.detach()
        return factor * loss, metrics
