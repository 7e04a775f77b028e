"""Config schemas of jobs/sample.py, jobs/evaluate.py and jobs/import_alitok.py (read with `load_config`).

`check_sample_config` / `check_evaluate_config` reject values the schema's types cannot
(ranges, missing inputs) with a `ConfigError`, before any resource is touched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from system.config.load import ConfigError
from system.config.methods import LPIPSConfig
from system.config.ranges import ok
from system.config.sections import MISSING, ClusterConfig, LoggingConfig, StorageConfig

Schedule = Literal["constant", "linear", "power-cosine"]


@dataclass
class SampleConfig:
    """jobs/sample.py: N = num_per_class x num_classes images from an exported AR run."""

    export_url: str = MISSING  # a run's export/ folder (model.json + safetensors), local or s3://
    out: Optional[str] = None  # folder for parts/, samples.npz, grids/; None: <run>/samples beside export/
    ema: bool = True  # use the EMA weights when the export has them
    num_per_class: int = field(default=50, metadata=ok(">= 1"))
    num_classes: Optional[int] = field(default=None, metadata=ok(">= 1"))  # None: the AR model's num_classes (model.json)
    cfg_scale: float = field(default=1.0, metadata=ok(">= 0"))  # classifier-free guidance; 1.0 = off
    cfg_schedule: Schedule = "constant"
    cfg_power: float = field(default=1.0, metadata=ok("> 0"))  # power of the power-cosine schedule
    temperature: float = field(default=1.0, metadata=ok(">= 0"))
    top_k: int = field(default=0, metadata=ok(">= 0"))  # 0 = off
    top_p: float = field(default=1.0, metadata=ok("in (0, 1]"))  # 1.0 = off
    batch_size: int = field(default=64, metadata=ok(">= 1"))  # images per part (one generate call); part content depends on it
    seed: int = field(default=0, metadata=ok(">= 0"))
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast on GPU
    compile: bool = False  # torch.compile the decode step (GPU)
    num_actors: int = field(default=0, metadata=ok(">= 0"))  # 0: one per GPU of the Ray cluster (CPU-only: one per cluster.cpus_per_worker CPUs)
    grid_classes: int = field(default=16, metadata=ok(">= 0"))  # PNG grids: first classes, one row each, 8 rows per PNG
    grid_cols: int = field(default=8, metadata=ok(">= 1"))
    progress: bool = True
    crash_at_part: Optional[int] = field(default=None, metadata=ok(">= 0"))  # fault injection: the actor making this part dies once
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


@dataclass
class EvaluateConfig:
    """jobs/evaluate.py: generation metrics of a sample npz and/or reconstruction metrics of a
    tokenizer export on a shard set, written as a JSON report."""

    samples: Optional[str] = None  # sample npz (arr_0: uint8 N x H x W x 3, labels)
    export_url: Optional[str] = None  # a run's export/ folder: reconstruction metrics on `shards`
    ema: bool = True
    out: Optional[str] = None  # report folder; None: beside the samples npz, else <run>/eval
    reference: Optional[str] = None  # ADM reference batch or stats npz; None: the images of `shards`
    shards: str = ".cache/embedded_shards/val"  # shard set: recon metrics; generation reference if none given
    embedded: bool = True  # build the embedded real-photo set at `shards` when it is missing
    max_images: int = field(default=0, metadata=ok(">= 0"))  # cap on images read from `shards` (0: all)
    batch_size: int = field(default=50, metadata=ok(">= 1"))
    inception_path: Optional[str] = None  # pytorch-fid pt_inception-2015-12-05 weights; None: random weights
    inception_preprocess: Literal["adm", "pytorch-fid"] = "adm"
    lpips: LPIPSConfig = field(default_factory=LPIPSConfig)  # no paths: random-weight LPIPS, labelled
    is_splits: int = field(default=10, metadata=ok(">= 1"))
    pr_k: int = field(default=3, metadata=ok(">= 1"))  # k of improved precision/recall
    run_name: Optional[str] = None  # wandb run name; None: derived from the inputs
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=lambda: ClusterConfig(num_workers=1))
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def check_sample_config(cfg: SampleConfig) -> None:
    """Cross-field rules (single-field ranges are declared on the fields and checked on load)."""


def check_evaluate_config(cfg: EvaluateConfig) -> None:
    if not cfg.samples and not cfg.export_url:
        raise ConfigError(
            "nothing to evaluate: set samples=<sample npz> (generation metrics) and/or "
            "export_url=<run export folder> (reconstruction metrics)"
        )
    if bool(cfg.lpips.vgg_path) != bool(cfg.lpips.lin_path):
        raise ConfigError("lpips.vgg_path and lpips.lin_path go together: give both (real LPIPS) or neither (random weights)")


@dataclass
class ImportAliTokConfig:
    """jobs/import_alitok.py: AliTok's released checkpoints (github.com/ali-vilab/alitok) -> an export
    folder that jobs/sample.py, jobs/evaluate.py, jobs/vapi.py and jobs/pretokenize.py read."""

    tokenizer: str = MISSING  # weights/AliTok.pth (a train_tokenizer checkpoint reads too)
    ar: Optional[str] = None  # weights/alitok_{b,l,xl}.bin; None: the tokenizer alone
    preset: Optional[str] = None  # alitok-b / alitok-l / alitok-xl; None: from the weights' width and depth
    overrides: dict[str, Any] = field(default_factory=dict)  # single GPTConfig fields (the released ones need none)
    out: str = MISSING  # the export folder (local or s3://)
    storage: StorageConfig = field(default_factory=StorageConfig)
