"""The one typed config schema (dataclasses read through OmegaConf structured configs).

Every job's root config is a dataclass below; YAML files under configs/ and `key=value`
overrides are merged onto it by `system.config.load_config`, which rejects unknown keys,
wrong types and missing values before any resource is touched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from system.losses.teachers import TeacherConfig

MISSING = "???"


@dataclass
class StorageConfig:
    """How to reach object storage (fsspec). Credentials come from the environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) unless given here; they are redacted on save."""

    endpoint_url: Optional[str] = None  # e.g. http://127.0.0.1:5000 for a local S3 endpoint
    region: Optional[str] = None
    key: Optional[str] = None
    secret: Optional[str] = None
    anon: bool = False
    max_attempts: int = 5  # botocore retry attempts for transient S3 errors
    retry_mode: Literal["standard", "adaptive", "legacy"] = "standard"


@dataclass
class DataConfig:
    url: str = MISSING  # shard set: a folder or s3://bucket/prefix holding index.json + *.tar
    val_url: Optional[str] = None
    resolution: int = 256
    batch_size: int = 32  # per rank micro-batch
    num_workers: int = 2  # dataloader workers per rank
    random_flip: bool = True
    fraction: float = 1.0  # use this fraction of the shard set's samples (VAπ uses 0.01)
    storage: StorageConfig = field(default_factory=StorageConfig)
    embedded: bool = False  # build the embedded real-photo shard set at `url` when missing


@dataclass
class ModelConfig:
    """Sizes come from registries with exact names; `*_overrides` change single fields."""

    tokenizer: str = "eostok-tok"
    tokenizer_overrides: dict[str, Any] = field(default_factory=dict)
    ar: str = "eostok-h"
    ar_overrides: dict[str, Any] = field(default_factory=dict)
    attn_backend: Literal["auto", "flash", "sdpa", "math"] = "auto"
    grad_checkpointing: bool = False
    compile: bool = False


@dataclass
class LPIPSConfig:
    vgg_path: Optional[str] = None  # torchvision vgg16 state dict
    lin_path: Optional[str] = None  # LPIPS v0.1 vgg.pth linear heads
    random_init: bool = False  # allowed only when no paths are given (demo/tests)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05
    warmup_steps: int = 1000
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0
    grad_accum: int = 1
    disc_lr: float = 1e-4
    disc_betas: tuple[float, float] = (0.5, 0.9)


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    offload_optimizer: bool = False
    offload_params: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # merged last into the generated DS config


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None: join RAY_ADDRESS if set, else start a local Ray
    num_workers: int = 8
    device: Literal["auto", "gpu", "cpu"] = "auto"  # auto: GPUs when the Ray cluster has them
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = 3  # worker losses tolerated; each restarts the pool from the last checkpoint
    # times Ray Train retries starting the worker group when it cannot be placed within
    # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) each, e.g. while a cluster autoscales; -1: forever
    startup_retries: int = 3
    local_num_cpus: Optional[int] = None  # CPUs for a locally started Ray


@dataclass
class CheckpointConfig:
    storage_path: str = "runs"  # local folder or s3://bucket/prefix; runs live in <storage_path>/<run_name>
    every_steps: int = 1000
    keep_last: int = 3
    resume: bool = True  # continue from the newest complete checkpoint of the same run name
    export: bool = True  # write consolidated safetensors at the end


@dataclass
class LoggingConfig:
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "tokenizer-ar"
    entity: Optional[str] = None
    log_every: int = 10
    progress: bool = True


@dataclass
class FaultConfig:
    """Inject a worker crash, for tests and for users to try fault tolerance."""

    crash_at_step: Optional[int] = None
    crash_rank: int = 0


@dataclass
class TrainConfig:
    max_steps: int = 100_000
    ema_decay: float = 0.9999
    ema_every: int = 1
    sample_every: int = 0  # 0: only at the end
    sample_grid: int = 8  # images per row of the PNG grid


@dataclass
class ExperimentConfig:
    """Fields shared by every training job; jobs subclass it with their `method` section."""

    run_name: str = MISSING
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)


@dataclass
class EOSTokMethodConfig:
    """Loss weights of EOSTok's end-to-end objective. A weight of 0 switches a term off, so the
    paper's ablation rows (two-stage baseline, NTP only, + APR, alignment variants) are configs."""

    l1: float = 0.0
    l2: float = 1.0
    lpips: float = 1.0
    gan: float = 0.1
    gan_start_step: int = 0
    adaptive_gan_weight: bool = False
    lecam: float = 0.05
    # commitment / entropy weights live in the tokenizer's quantizer config
    # (model.tokenizer_overrides={quantizer: {commit_weight: ..., entropy_weight: ...}})
    ntp: float = 0.1
    ntp_label_smoothing: float = 0.0
    apr_l2: float = 1.0
    apr_lpips: float = 1.0
    align: float = 0.5  # implicit alignment: encoder 2D hidden patches vs teacher features
    repa: float = 0.0  # REPA-style decoder alignment
    repa_layer: int = 1
    detach_ar_input: bool = False  # True: two-stage baseline (no NTP gradient into the tokenizer)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    lpips_net: LPIPSConfig = field(default_factory=LPIPSConfig)
    sample_cfg_scale: float = 2.0
    sample_temperature: float = 1.0


@dataclass
class EOSTokExperiment(ExperimentConfig):
    method: EOSTokMethodConfig = field(default_factory=EOSTokMethodConfig)


@dataclass
class MakeShardsConfig:
    """jobs/make_shards.py: ImageNet-layout folder -> WebDataset shards + index.json."""

    src: str = MISSING  # folder with train/<wnid>/*.JPEG (and val/)
    out: str = MISSING  # fsspec URL; each split goes to <out>/<split>/
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    val_labels: Optional[str] = None  # file "<filename> <wnid-or-index>" per line, for a flat val/
    shard_size: int = 1000  # samples per shard
    max_side: int = 0  # >0: re-encode images whose shorter side exceeds this (keeps the aspect)
    parallelism: int = 0  # concurrent Ray tasks; 0: one per available CPU
    seed: int = 0  # order of files across shards
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=lambda: ClusterConfig(num_workers=1))
