"""The one contract between a training method (pure PyTorch) and the rank loop that runs it
(cluster/loop.py), for every method: EOSTok joint training, VAπ's policy, the toy methods of the
tests, and next AliTok / SemTok stages and AR training.

A method declares its trainable modules (`modules()`: each with its own optimiser settings and EMA
choice), the order of its optimiser phases (`phases()`: each phase steps the module of the same
name), computes one phase's loss as a function of (modules, batch, step, carry) (`step`), and says
what it exports (`artifacts`). The loop owns engines (DeepSpeed ZeRO), the LR schedule, EMA,
metrics, checkpoints, fault injection and export; a method never sees them. Cross-rank needs
(global codebook usage, contrastive negatives, per-rank buffers reduced) go through the
`Collective` the loop hands the method (`self.collective`), so system/ never imports
torch.distributed. Frozen helpers (teachers, LPIPS) belong to the method itself (`frozen_parts`, moved by `to(device)`).

    for phase in method.phases():                       # e.g. ["gen", "disc"], ["policy"]
        with frozen(every other module), autocast:
            out = method.step(phase, modules, batch, step, carry)
        backward(out.loss); optimiser step of modules[phase]
        carry.update(out.aux)                          # detached tensors for the next phase

A method is registered once (system/methods/registry.py): name -> (config type, method class).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Optional

import torch
from torch import Tensor, nn

from system.data.source import BatchSource  # noqa: F401  (re-exported: the contract's data side)
from system.data.sources import DataSpec  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from system.models.artifacts import Artifact


@dataclass
class ModuleSpec:
    """One trainable module, wrapped by the loop in one engine. None: the experiment's `optim.*`."""

    module: nn.Module
    lr: Optional[float] = None
    betas: Optional[tuple[float, float]] = None
    weight_decay: Optional[float] = None
    ema_decay: float = 0.0  # > 0: the loop keeps an EMA of this module (exported as <part>_ema)
    # names (as in module.named_parameters()) kept out of weight decay besides the engine's own rule (no
    # decay on biases, norms, scalars: < 2 dims); e.g. the embedding tables (AliTok's AR code)
    no_decay: tuple[str, ...] = ()


@dataclass
class RunReport:
    """What a finished run says about itself (its method decides): the final table's rows and the
    extra keys of `<run>/result.json` (a pipeline's step summary reads them)."""

    rows: list[tuple[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepOutput:
    """One phase's scalar loss (to backprop), metrics (tensors stay on the device; the loop syncs
    them only when it logs) and detached tensors for the next phase or the sample grid (`aux`)."""

    loss: Tensor
    metrics: dict[str, Any] = field(default_factory=dict)
    aux: dict[str, Any] = field(default_factory=dict)


class Collective:
    """Cross-rank operations a method may use; this default is the single-process identity
    (the loop hands a torch.distributed one to every rank)."""

    rank: int = 0
    world_size: int = 1

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """`t` reduced over ranks ("sum" | "mean" | "max"), out of place."""
        return t.clone()

    def all_gather(self, t: Tensor) -> Tensor:
        """Every rank's `t` (same shape on every rank) concatenated along dim 0, in rank order."""
        return t.clone()


class Method:
    """Base class of every method. Subclasses set `Config` (the dataclass of their `method:`
    section) and implement `modules`, `phases`, `step` and `artifacts`; the hooks below have
    working defaults and are part of the contract (the loop calls them unconditionally)."""

    Config: ClassVar[type]
    collective: Collective = Collective()

    def __init__(self, cfg: Any, data: DataSpec):
        self.cfg, self.data = cfg, data

    # ------------------------------------------------------------------ required
    def modules(self) -> dict[str, ModuleSpec]:
        """Fresh trainable modules by name. Built anew on each call (the loop calls it once per
        rank to train, and again on rank 0 for plain copies when ZeRO-3 partitions parameters);
        the loop seeds the RNG identically on every rank before the first call."""
        raise NotImplementedError

    def phases(self) -> list[str]:
        """The order of optimiser steps within one training step; each names a module."""
        raise NotImplementedError

    def step(self, phase: str, mods: dict[str, nn.Module], batch: Any, step: int, carry: dict) -> StepOutput:
        """The loss of `phase` (every module but `mods[phase]` is frozen). `carry` holds the aux of
        the earlier phases of this step."""
        raise NotImplementedError

    def artifacts(self, mods: dict[str, nn.Module]) -> dict[str, Artifact]:
        """The exported parts (weights + model config + kind), from full (gathered) modules."""
        raise NotImplementedError

    # ------------------------------------------------------------------ hooks with defaults
    @classmethod
    def check(cls, cfg: Any, data: DataSpec) -> None:
        """Raise ValueError (naming the config key) for a config this method cannot run, before
        any resource is allocated."""

    def frozen_parts(self) -> list[nn.Module]:
        """The method's own frozen modules (teachers, LPIPS, VAEs, references): what `to` moves."""
        return []

    def to(self, device: torch.device) -> "Method":
        """Move the method's frozen helpers (`frozen_parts`) to `device`."""
        for m in self.frozen_parts():
            m.to(device)
        return self

    def sample_images(self, mods: dict[str, nn.Module], batch: Any, seed: int) -> dict[str, Tensor]:
        """Named image rows in [-1, 1] for a PNG grid ({}: the method draws none)."""
        return {}

    def validate(self, mods: dict[str, nn.Module], batch: Any) -> dict[str, Tensor]:
        """Sums of one validation batch ({}: the method has none), e.g. {"count", "psnr_sum",
        "code_hist" (K,)}: the loop adds them over its batches and all ranks (same keys and shapes on
        every rank; no collectives here) and hands the totals to `val_metrics`. Runs in eval mode
        under no_grad, on every rank in lockstep (same number of batches)."""
        return {}

    def val_metrics(self, totals: dict[str, Tensor]) -> dict[str, float]:
        """Metrics of the whole validation sample from the summed `validate` outputs."""
        return {}

    def sample_batch(self, batch: Any, n: int) -> Any:
        """The first `n` examples of `batch` for `sample_images` (None: no grid from this batch)."""
        if isinstance(batch, dict):
            return {k: (v[:n] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}
        return None

    def rate_metrics(self, samples_per_s: float) -> dict[str, float]:
        """Throughput metrics derived from a log window's global samples/s (e.g. tokens/s, MFU);
        called on every rank when the loop logs."""
        return {}

    def curve_keys(self) -> list[str]:
        """Metric names drawn in the run's curves.png, one panel each ("a|b": two in one panel)."""
        return ["loss"]

    # the last logged metrics a finished run shows (and keeps in its result.json), in this order
    report_keys: ClassVar[tuple[str, ...]] = ("step", "loss", "images_per_s")

    @classmethod
    def report(cls, cfg: Any, metrics: dict[str, Any], val: dict[str, float], export_url: Optional[str],
               val_of: Callable[[str], dict[str, float]]) -> RunReport:
        """The finished run's report from its last metrics, the last value of each validation metric
        (`val`: "val_start/psnr", "val/psnr", "val_ema/psnr", ...) and its export; `val_of(url)`
        reads another run's (e.g. an input export's run) the same way."""
        rows = [(k, metrics[k]) for k in cls.report_keys if k in metrics]
        rows += [(k, v) for k, v in sorted(val.items())]
        return RunReport(rows, {"validation": val} if val else {})

    def external_parameters(self, name: str, module: nn.Module) -> list[nn.Parameter]:
        """Parameters of `module` read outside its own forward (ZeRO-3 must register them)."""
        return []

    def state_dict(self) -> dict:
        """Per-rank method state a checkpoint keeps (beyond module weights and buffers)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@contextmanager
def frozen(*modules: Optional[nn.Module]) -> Iterator[None]:
    """Parameters of `modules` get no gradients inside (flags restored on exit)."""
    flags = [(p, p.requires_grad) for m in modules if m is not None for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
