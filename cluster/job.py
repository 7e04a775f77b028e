"""What the driver hands every rank of a training pool (light: no DeepSpeed import)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from system.data.sources import DataSpec, ImageShards, SourceFactory
from system.methods.base import Method


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device
    # report(metrics, checkpoint_url or None): all ranks call it at each commit (Ray: ray.train.report)
    report: Callable[[dict, Optional[str]], None] = field(default=lambda metrics, url: None)
    # progress(event): rank 0's small events for the driver's console (start, step, checkpoint)
    progress: Callable[[dict], None] = field(default=lambda event: None)
    # preempted(): whether the pool announced that a node of this run is about to be taken (Ray:
    # `ray.train.get_preemption_info() is not None`); the loop calls it once per step on every rank
    preempted: Callable[[], bool] = field(default=lambda: False)


@dataclass
class TrainJob:
    """What the driver resolved once for every rank: the method class, its data spec, the batch
    source (the method's registered one, or one bound to an actor pool), the per-rank micro-batch
    (DeepSpeed's bookkeeping) and this submission's id."""

    method: type[Method]
    data: DataSpec
    source: SourceFactory = field(default_factory=ImageShards)
    micro_batch_size: int = 1
    submission: str = ""
