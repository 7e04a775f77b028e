"""The contract between a training method (pure PyTorch) and the pools that run it.

A method builds its trainable modules and computes one step's losses as a function of
(modules, batch). The cluster layer owns optimisers, ZeRO, EMA, checkpoints and logging;
a method never sees them. Frozen helpers (teachers, LPIPS) belong to the method itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Protocol

import torch
from torch import nn


@dataclass
class StepOutput:
    """One step's scalar loss (to backprop), float metrics (to log), and tensors that the
    discriminator step or the sample grid may reuse (`aux`, detached)."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    aux: dict[str, Any] = field(default_factory=dict)


class Method(Protocol):
    def build_generator(self) -> nn.Module:
        """The module optimised by the main engine (e.g. tokenizer + AR wrapped together)."""

    def build_discriminator(self) -> Optional[nn.Module]:
        """A second module optimised alternately (None when the method has no GAN term)."""

    def to(self, device: torch.device) -> "Method":
        """Move the method's frozen helpers (teachers, LPIPS) to `device`."""

    def generator_step(
        self, gen: nn.Module, disc: Optional[nn.Module], batch: dict, step: int
    ) -> StepOutput:
        """Losses for the generator; `disc` is used frozen (no grads to its parameters)."""

    def discriminator_step(self, disc: nn.Module, batch: dict, aux: dict, step: int) -> StepOutput:
        """Losses for the discriminator from the generator step's detached outputs (`aux`)."""

    @torch.no_grad()
    def sample_images(self, gen: nn.Module, batch: dict, seed: int) -> dict[str, torch.Tensor]:
        """Named image rows in [-1, 1] (originals, reconstructions, samples) for a PNG grid."""

    def export(self, gen: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """Consolidated weights to save as separate safetensors files, e.g. {"tokenizer": sd, "ar": sd}."""

    # Optional hooks the pool uses when a method defines them:
    #   export_configs() -> {"tokenizer": {...}, "ar": {...}}  written as export/model.json
    #   train_state_dict() / load_train_state_dict(sd)        extra per-rank state in checkpoints
    #   generator modules may define external_parameters()    parameters read outside their
    #                                                          own module's forward (ZeRO-3)


@contextmanager
def frozen(module: Optional[nn.Module]) -> Iterator[None]:
    """Parameters of `module` get no gradients inside (flags restored on exit)."""
    if module is None:
        yield
        return
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
