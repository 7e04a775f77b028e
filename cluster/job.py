"""What the driver hands every rank of a training pool (light: no DeepSpeed import), and the
contexts the rank loop (cluster/loop.py) hands a batch-source factory."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from system.config import Experiment
from system.data.source import BatchSource
from system.methods.base import Collective, DataSpec, Method


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device
    # report(metrics, checkpoint_url or None): all ranks call it at each commit (Ray: ray.train.report)
    report: Callable[[dict, Optional[str]], None] = field(default=lambda metrics, url: None)
    # progress(event): rank 0's small events for the driver's console (start, step, checkpoint)
    progress: Callable[[dict], None] = field(default=lambda event: None)


@dataclass
class SourceContext:
    """What a batch-source factory gets on each rank."""

    rank: int
    world_size: int
    device: torch.device
    seed: int
    max_steps: int
    collective: Collective
    # collective: the full weights of a trained module as CPU tensors on rank 0 ({} elsewhere)
    module_state: Callable[[str], dict]
    step: Callable[[], int]  # the loop's current step (updates done so far)


SourceFactory = Callable[[Experiment, SourceContext], BatchSource]


class ImageShards:
    """The default batch source: this rank's `ShardReader` over `data.url` (picklable factory)."""

    def __call__(self, exp: Experiment, ctx: SourceContext) -> BatchSource:
        from system.data.reader import ShardReader

        return ShardReader.from_config(exp.data, rank=ctx.rank, world_size=ctx.world_size, seed=exp.seed)


class TokenShards:
    """Pre-tokenized batches: this rank's `TokenShardReader` over `data.url` (a `TokenDataConfig`;
    picklable factory)."""

    def __call__(self, exp: Experiment, ctx: SourceContext) -> BatchSource:
        from system.data.reader import TokenShardReader

        return TokenShardReader.from_config(exp.data, rank=ctx.rank, world_size=ctx.world_size, seed=exp.seed)


@dataclass
class TrainJob:
    """What the driver resolved once for every rank: the method class, its data spec, the batch
    source, the per-rank micro-batch (DeepSpeed's bookkeeping) and this submission's id."""

    method: type[Method]
    data: DataSpec
    source: SourceFactory = field(default_factory=ImageShards)
    micro_batch_size: int = 1
    submission: str = ""


