"""One typed root per job: the infra sections (sections.py) plus the job's `method` section of
its method's own type (methods.py). A key that means nothing for a job is an unknown key for it
(e.g. `method.model` or `method.disc_lr` for VAπ)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from system.config.methods import EOSTokConfig, VapiConfig
from system.config.ranges import ok
from system.config.sections import *  # noqa: F401,F403 (the infra sections)


@dataclass
class Experiment:
    """The sections every training job shares; a job's root subclasses it with its `method`."""

    run_name: str = MISSING
    seed: int = field(default=0, metadata=ok(">= 0"))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)


@dataclass
class EOSTokExperiment(Experiment):
    """jobs/eostok_h.py"""

    method: EOSTokConfig = field(default_factory=EOSTokConfig)


@dataclass
class VapiExperiment(Experiment):
    """jobs/vapi.py: the paper's run shape by default (about 100 updates of 128 images x group 8,
    lr 1e-6, 1% of the shards). `data.batch_size` is images per iteration over all learner ranks."""

    data: DataConfig = field(default_factory=lambda: DataConfig(fraction=0.01, batch_size=128))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-6, min_lr=1e-6, betas=(0.9, 0.999), weight_decay=1e-4, warmup_steps=0, schedule="constant", grad_clip=1.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_steps=20))
    method: VapiConfig = field(default_factory=VapiConfig)


@dataclass
class MakeShardsConfig:
    """jobs/make_shards.py: ImageNet-layout folder -> WebDataset shards + index.json."""

    src: str = MISSING  # folder with train/<wnid>/*.JPEG (and val/)
    out: str = MISSING  # fsspec URL; each split goes to <out>/<split>/
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    val_labels: Optional[str] = None  # file "<filename> <wnid-or-index>" per line, for a flat val/
    shard_size: int = field(default=1000, metadata=ok(">= 1"))  # samples per shard
    max_side: int = field(default=0, metadata=ok(">= 0"))  # >0: re-encode images whose shorter side exceeds this (keeps the aspect)
    parallelism: int = field(default=0, metadata=ok(">= 0"))  # concurrent Ray tasks; 0: one per available CPU
    seed: int = field(default=0, metadata=ok(">= 0"))  # order of files across shards
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=lambda: ClusterConfig(num_workers=1))
