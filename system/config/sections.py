"""Infrastructure sections shared by every job: storage, data, optimiser, DeepSpeed, cluster,
checkpoints, logging, training length, fault injection. No model names live here (those belong to
each method's config in methods.py). Dataclasses only: this package imports nothing else from
`system/` and not torch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

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
    batch_size: int = 32  # per rank micro-batch (VAπ: images per iteration over all learner ranks)
    num_workers: int = 2  # dataloader workers per rank
    random_flip: bool = True
    fraction: float = 1.0  # use this fraction of the shard set's samples (VAπ uses 0.01)
    storage: StorageConfig = field(default_factory=StorageConfig)
    embedded: bool = False  # build the embedded real-photo shard set at `url` when missing


@dataclass
class OptimConfig:
    """AdamW + schedule for every trainable module; a method may give a module its own lr/betas
    (e.g. EOSTok's discriminator: method.disc_lr, method.disc_betas)."""

    lr: float = 1e-4
    min_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05
    warmup_steps: int = 1000
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0
    grad_accum: int = 1


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
    progress: bool = True  # the driver's progress bar (step, loss, img/s, ETA)
    verbose: bool = False  # also show worker output and library logs on the console (else: <run>/logs/)


@dataclass
class FaultConfig:
    """Inject a worker crash, for tests and for users to try fault tolerance."""

    crash_at_step: Optional[int] = None
    crash_rank: int = 0


@dataclass
class TrainConfig:
    max_steps: int = 100_000
    ema_every: int = 1  # steps between EMA updates of the modules a method keeps an EMA of
    sample_every: int = 0  # 0: only at the end (methods that draw sample grids)
    sample_grid: int = 8  # images per row of the PNG grid
    compile: bool = False  # torch.compile every trained module
