"""Infrastructure sections shared by every job: storage, data, optimiser, DeepSpeed, cluster,
checkpoints, logging, training length, fault injection. No model names live here (those belong to
each method's config in methods.py). Dataclasses only: this package imports nothing else from
`system/` and not torch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from system.config.ranges import ok

__all__ = ["MISSING", "StorageConfig", "DataConfig", "TokenDataConfig", "OptimConfig", "DeepSpeedConfig", "ClusterConfig",
           "CheckpointConfig", "LoggingConfig", "FaultConfig", "TrainConfig"]

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
    max_attempts: int = field(default=5, metadata=ok(">= 1"))  # botocore retry attempts for transient S3 errors
    retry_mode: Literal["standard", "adaptive", "legacy"] = "standard"
    # then each request is retried with exponential back-off (+ jitter) for up to this many seconds
    # before its error counts (an outage of the endpoint, 5xx, throttling); 0: no retry beyond botocore's.
    # Keep it below the process-group timeout (30 min): the other ranks wait for this one meanwhile
    retry_budget_s: float = field(default=600.0, metadata=ok(">= 0"))
    retry_max_delay_s: float = field(default=30.0, metadata=ok("> 0"))  # cap of one back-off wait


@dataclass
class DataConfig:
    url: str = MISSING  # shard set: a folder or s3://bucket/prefix holding index.json + *.tar
    val_url: Optional[str] = None
    resolution: int = field(default=256, metadata=ok(">= 8"))
    batch_size: int = field(default=32, metadata=ok(">= 1"))  # per rank micro-batch (VAπ: images per iteration over all learner ranks)
    num_workers: int = field(default=2, metadata=ok(">= 0"))  # dataloader workers per rank
    random_flip: bool = True
    fraction: float = field(default=1.0, metadata=ok("in (0, 1]"))  # use this fraction of the shard set's samples (VAπ uses 0.01)
    storage: StorageConfig = field(default_factory=StorageConfig)
    embedded: bool = False  # build the embedded real-photo shard set at `url` when missing


@dataclass
class TokenDataConfig:
    """Pre-tokenized images (token shards written by jobs/pretokenize.py) for AR training."""

    url: str = MISSING  # token shard set: a folder or s3://bucket/prefix holding index.json (with a tokens section) + *.tar
    val_url: Optional[str] = None  # token shards for validation (read once per evaluation, short last batch)
    batch_size: int = field(default=32, metadata=ok(">= 1"))  # per rank micro-batch of token sequences
    num_workers: int = field(default=2, metadata=ok(">= 0"))  # dataloader workers per rank
    fraction: float = field(default=1.0, metadata=ok("in (0, 1]"))  # use this fraction of the set's samples (views)
    storage: StorageConfig = field(default_factory=StorageConfig)  # how to reach url / val_url


@dataclass
class OptimConfig:
    """AdamW + schedule for every trainable module; a method may give a module its own lr/betas
    (e.g. EOSTok's discriminator: method.disc_lr, method.disc_betas)."""

    lr: float = field(default=1e-4, metadata=ok("> 0"))
    min_lr: float = field(default=1e-5, metadata=ok(">= 0"))
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = field(default=1e-8, metadata=ok("> 0"))
    weight_decay: float = field(default=0.05, metadata=ok(">= 0"))
    warmup_steps: int = field(default=1000, metadata=ok(">= 0"))
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = field(default=1.0, metadata=ok(">= 0"))
    grad_accum: int = field(default=1, metadata=ok(">= 1"))


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
    num_workers: int = field(default=8, metadata=ok(">= 1"))
    device: Literal["auto", "gpu", "cpu"] = "auto"  # auto: GPUs when the Ray cluster has them
    cpus_per_worker: float = field(default=1.0, metadata=ok("> 0"))
    gpus_per_worker: float = field(default=1.0, metadata=ok(">= 0"))
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = field(default=3, metadata=ok(">= 0"))  # worker losses tolerated; each restarts the pool from the last checkpoint
    # times Ray Train retries starting the worker group when it cannot be placed within
    # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) each, e.g. while a cluster autoscales; -1: forever
    startup_retries: int = field(default=3, metadata=ok(">= -1"))
    local_num_cpus: Optional[int] = field(default=None, metadata=ok(">= 1"))  # CPUs for a locally started Ray


@dataclass
class CheckpointConfig:
    storage_path: str = "runs"  # local folder or s3://bucket/prefix; runs live in <storage_path>/<run_name>
    # a local storage_path is the same folder on every node (NFS, a shared PVC): required for a local
    # storage_path when the Ray cluster has more than one node (else each rank writes to its own disk)
    shared: bool = False
    every_steps: int = field(default=1000, metadata=ok(">= 1"))
    keep_last: int = field(default=3, metadata=ok(">= 1"))
    resume: bool = True  # continue from the newest complete checkpoint of the same run name
    export: bool = True  # write consolidated safetensors at the end


@dataclass
class LoggingConfig:
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "tokenizer-ar"
    entity: Optional[str] = None
    log_every: int = field(default=10, metadata=ok(">= 1"))
    progress: bool = True  # the driver's progress bar (step, loss, img/s, ETA)
    verbose: bool = False  # also show worker output and library logs on the console (else: <run>/logs/)
    redact: list[str] = field(default_factory=list)  # more key names to hide in saved configs (besides credentials)


@dataclass
class FaultConfig:
    """Inject a worker crash, for tests and for users to try fault tolerance."""

    crash_at_step: Optional[int] = field(default=None, metadata=ok(">= 1"))
    crash_rank: int = field(default=0, metadata=ok(">= 0"))


@dataclass
class TrainConfig:
    max_steps: int = field(default=100_000, metadata=ok(">= 1"))
    ema_every: int = field(default=1, metadata=ok(">= 1"))  # steps between EMA updates of the modules a method keeps an EMA of
    sample_every: int = field(default=0, metadata=ok(">= 0"))  # 0: only at the end (methods that draw sample grids)
    sample_grid: int = field(default=8, metadata=ok(">= 0"))  # images per row of the PNG grid
    compile: bool = False  # torch.compile every trained module
    # validation on the workers over data.val_url, sharded over ranks (methods with a `validate`): at the
    # start of a fresh run (the untrained baseline), every val_every steps and at the end (raw and EMA weights)
    val_every: int = field(default=0, metadata=ok(">= 0"))  # 0: at the start and the end only
    val_max_images: int = field(default=1000, metadata=ok(">= 0"))  # images per validation over all ranks; 0: the whole split
