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
    # preempted(): whether the pool announced that a node of this run is about to be taken (Ray:
    # `ray.train.get_preemption_info() is not None`); the loop calls it once per step on every rank
    preempted: Callable[[], bool] = field(default=lambda: False)


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


class _ShardFactory:
    """A picklable batch-source factory: this rank's reader (`reader`, a `ShardSource` class) over
    `data.url`; `validation`: its share of `data.val_url` (None without one)."""

    reader_name = ""

    def _reader(self):
        from system.data import stream as reader

        return getattr(reader, self.reader_name)

    def __call__(self, exp: Experiment, ctx: SourceContext) -> BatchSource:
        return self._reader().from_config(exp.data, rank=ctx.rank, world_size=ctx.world_size, seed=exp.seed,
                                          pin_memory=ctx.device.type == "cuda")

    def validation(self, exp: Experiment, ctx: SourceContext) -> Optional[BatchSource]:
        if not exp.data.val_url:
            return None
        return self._reader().from_config(exp.data, rank=ctx.rank, world_size=ctx.world_size, seed=exp.seed, val=True)


class ImageShards(_ShardFactory):
    """The default batch source: `ShardReader` over image shards (`DataConfig`)."""

    reader_name = "ShardReader"


class TokenShards(_ShardFactory):
    """Pre-tokenized batches: `TokenShardReader` over token shards (`TokenDataConfig`)."""

    reader_name = "TokenShardReader"


@dataclass
class TrainJob:
    """What the driver resolved once for every rank: the method class, its data spec, the batch
    source, the per-rank micro-batch (DeepSpeed's bookkeeping) and this submission's id."""

    method: type[Method]
    data: DataSpec
    source: SourceFactory = field(default_factory=ImageShards)
    micro_batch_size: int = 1
    submission: str = ""


