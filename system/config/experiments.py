"""One typed root per job: the infra sections (sections.py) plus the job's `method` section of
its method's own type (methods.py). A key that means nothing for a job is an unknown key for it
(e.g. `method.model` or `method.disc_lr` for VAπ)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from system.config.methods import (
    AliTokStage1Config, AliTokStage2Config, ARConfig, EOSTokConfig, LatentVAEConfig, LatentVAETrainConfig, MaskedARConfig,
    SemTokStage1Config, SemTokStage2Config, VapiConfig)
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
class AliTokStage1Experiment(Experiment):
    """jobs/alitok.py stage=1: AliTok tokenizer stage 1 (causal decoder)."""

    stage: Literal[1, 2] = 1  # 1: causal-decoder stage (method.*: AliTokStage1Config); 2: AliTokStage2Config
    method: AliTokStage1Config = field(default_factory=AliTokStage1Config)


@dataclass
class AliTokStage2Experiment(Experiment):
    """jobs/alitok.py stage=2: AliTok tokenizer stage 2 (a new bidirectional decoder on the frozen stage-1 encoder)."""

    stage: Literal[1, 2] = 2  # 2: bidirectional-decoder stage (method.*: AliTokStage2Config); 1: AliTokStage1Config
    method: AliTokStage2Config = field(default_factory=AliTokStage2Config)


@dataclass
class LatentVAEExperiment(Experiment):
    """jobs/semtok.py step vae: a small SD3.5-shaped VAE fitted to the images (the demo's stand-in
    for the pretrained SD3.5 VAE)."""

    method: LatentVAETrainConfig = field(default_factory=LatentVAETrainConfig)


@dataclass
class SemTokStage1Experiment(Experiment):
    """jobs/semtok.py step stage1: SemTok generative pre-training (flow matching)."""

    method: SemTokStage1Config = field(default_factory=SemTokStage1Config)


@dataclass
class SemTokStage2Experiment(Experiment):
    """jobs/semtok.py step stage2: SemTok one-step refiner on the frozen stage I tokens."""

    method: SemTokStage2Config = field(default_factory=SemTokStage2Config)


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
class RunSpec:
    """One of several runs a job starts side by side (`runs.<name>.*`): the run is named
    `<run_name>-<name>` and is the job's config with these changes."""

    model: Optional[str] = None  # method.model of this run (a size preset); None: the job's
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, e.g. {optim.lr: 3.0e-4, method.overrides: {n_layer: 4}}


@dataclass
class ARExperiment(Experiment):
    """jobs/train_ar.py: next-token AR on token shards (jobs/pretokenize.py), LlamaGen's recipe by
    default. `runs` starts several sizes side by side, one Ray Train run each."""

    objective: Literal["ar", "masked_ar"] = "ar"  # ar: next-token (method.*: ARConfig); masked_ar: SemTok masked AR (MaskedARConfig)
    data: TokenDataConfig = field(default_factory=TokenDataConfig)
    method: ARConfig = field(default_factory=ARConfig)
    runs: dict[str, RunSpec] = field(default_factory=dict)  # name -> size/overrides; empty: one run named run_name


@dataclass
class MaskedARExperiment(ARExperiment):
    """jobs/train_ar.py objective=masked_ar: SemTok-style masked AR on token shards."""

    objective: Literal["ar", "masked_ar"] = "masked_ar"  # masked_ar: SemTok masked AR (method.*: MaskedARConfig); ar: next-token
    method: MaskedARConfig = field(default_factory=MaskedARConfig)


@dataclass
class MakeShardsConfig:
    """jobs/make_shards.py: ImageNet-layout folder -> WebDataset shards + index.json."""

    src: str = MISSING  # folder with train/<wnid>/*.JPEG (and val/)
    out: str = MISSING  # fsspec URL; each split goes to <out>/<split>/
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    val_labels: Optional[str] = None  # flat val/: LOC_val_solution.csv, ILSVRC2012_validation_ground_truth.txt, or "<file> <wnid>" lines
    val_synsets: Optional[str] = None  # with the devkit's ground truth: its data/meta.mat (or a "<wnid> <ILSVRC2012_ID>" map)
    shard_size: int = field(default=1000, metadata=ok(">= 1"))  # samples per shard
    max_side: int = field(default=0, metadata=ok(">= 0"))  # >0: re-encode images whose shorter side exceeds this (keeps the aspect)
    parallelism: int = field(default=0, metadata=ok(">= 0"))  # concurrent Ray tasks; 0: one per available CPU
    seed: int = field(default=0, metadata=ok(">= 0"))  # order of files across shards
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=lambda: ClusterConfig(num_workers=1))


@dataclass
class PretokenizeConfig:
    """jobs/pretokenize.py: image shards -> token shards (codes of every augmented view) for AR training."""

    src: str = MISSING  # image shard set (a folder or s3://bucket/prefix holding index.json), e.g. <shards>/train
    out: str = MISSING  # token shard set to write (gets index.json + one token shard per image shard)
    export_url: str = MISSING  # exported tokenizer folder (model.json + tokenizer*.safetensors): tokenizer1d, llamagen-vq
    part: str = "tokenizer"  # the export's part holding the tokenizer
    augment: Literal["none", "flip", "ten-crop"] = "none"  # views per image: 1, 2 (mirror), 10 (LlamaGen's ten-crop)
    resolution: Optional[int] = field(default=None, metadata=ok(">= 8"))  # pixels encoded; None: the tokenizer's own size
    batch_size: int = field(default=64, metadata=ok(">= 1"))  # views per encoder forward pass
    shard_size: int = field(default=0, metadata=ok(">= 0"))  # source images per token shard; 0: one token shard per image shard
    num_actors: int = field(default=0, metadata=ok(">= 0"))  # tokenizer actors; 0: as many as the cluster fits
    storage: StorageConfig = field(default_factory=StorageConfig)  # src, out and export_url storage
    # cluster.device: where actors encode; cluster.cpus/gpus_per_worker: per actor; cluster.max_failures: actor deaths tolerated
    cluster: ClusterConfig = field(default_factory=lambda: ClusterConfig(num_workers=1, max_failures=3))


@dataclass
class LatentCacheConfig:
    """cluster/latent_pool.py (a SemTok pipeline step): image shards -> latent shards, each view's
    pixels with its frozen-VAE latents (system/data/latents.py), so training reads the latents
    instead of running the VAE every step (point data.url at `out`; data.resolution = resolution)."""

    src: str = MISSING  # image shard set (a folder or s3://bucket/prefix holding index.json), e.g. <shards>/train
    out: str = MISSING  # latent shard set to write (gets index.json + one latent shard per image shard)
    vae: LatentVAEConfig = field(default_factory=LatentVAEConfig)  # the frozen VAE: the one training decodes with
    augment: Literal["none", "flip"] = "flip"  # views per image: 1 (the centre crop), 2 (it and its mirror)
    resolution: int = field(default=MISSING, metadata=ok(">= 8"))  # pixels encoded (a multiple of 8); = the training's data.resolution
    batch_size: int = field(default=64, metadata=ok(">= 1"))  # views per VAE forward pass
    shard_size: int = field(default=0, metadata=ok(">= 0"))  # source images per latent shard; 0: one latent shard per image shard
    num_actors: int = field(default=0, metadata=ok(">= 0"))  # VAE actors; 0: as many as the cluster fits
    storage: StorageConfig = field(default_factory=StorageConfig)  # src, out and vae.export storage
    # cluster.device: where actors encode; cluster.cpus/gpus_per_worker: per actor; cluster.max_failures: actor deaths tolerated
    cluster: ClusterConfig = field(default_factory=lambda: ClusterConfig(num_workers=1, max_failures=3))
