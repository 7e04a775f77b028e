"""Typed wiring: what one step of a pipeline hands the next, set on the loaded config tree by
attribute (`cfg.ar.data.url = ...`: OmegaConf checks each name and type as it is assigned), never by
dotted strings. `system.config.load.load_sectioned_config` runs a pipeline's `wire(cfg)` and refuses
a file or command-line value that the wiring sets differently.

The functions take the sections as their dataclass types (at run time the typed OmegaConf nodes of
those dataclasses)."""
from __future__ import annotations

from typing import Optional

from system.config import EvaluateConfig, Experiment, LatentCacheConfig, PretokenizeConfig, SampleConfig, StorageConfig
from system.config.pipelines import ImagePipelineConfig
from system.data.storage import join


def train_in(exp: Experiment, root: str, name: str, storage: StorageConfig) -> None:
    """A training section runs as `<root>/<name>` (its checkpoints, export, metrics) on `storage`."""
    exp.run_name = name
    exp.checkpoint.storage_path = root
    exp.data.storage = storage


def on_images(exp: Experiment, cfg: ImagePipelineConfig) -> None:
    """A training section learns from the pipeline's image shard sets."""
    exp.data.url = cfg.images
    exp.data.val_url = cfg.val_images
    exp.data.embedded = cfg.embedded


def export_of(root: str, name: str) -> str:
    """The export folder of the training step `name` of a pipeline rooted at `root`."""
    return join(root, name, "export")


def encode(enc: PretokenizeConfig | LatentCacheConfig, src: str, out: str, storage: StorageConfig) -> None:
    """An encode step reads the image shard set `src` and writes `out`."""
    enc.src, enc.out, enc.storage = src, out, storage


def sample_from(sample: SampleConfig, export: str, out: str, storage: StorageConfig) -> None:
    sample.export_url, sample.out, sample.storage = export, out, storage


def evaluate_on(ev: EvaluateConfig, export: str, samples: Optional[str], out: str, cfg: ImagePipelineConfig) -> None:
    """Evaluate `export` (reconstructions of the held-out images) and `samples` (None: no generation
    metrics) against the pipeline's held-out images."""
    ev.export_url, ev.samples, ev.out, ev.storage = export, samples, out, cfg.storage
    ev.shards, ev.embedded = cfg.val_images or cfg.images, cfg.embedded


def tokens_to_ar(cfg: ImagePipelineConfig, root: str, steps: list[str], tokenizer: str, enc: PretokenizeConfig,
                 ar: Experiment, sample: SampleConfig, ev: EvaluateConfig, ar_name: str = "ar") -> None:
    """The tail every two-stage pipeline shares: the images pre-tokenized with `tokenizer` (an export
    URL) into <root>/tokens, the AR section trained on them as <root>/<ar_name> (its export holds the
    tokenizer too), sampled into <root>/samples and evaluated into <root>/eval."""
    tokens = join(root, "tokens")
    encode(enc, cfg.images, tokens, cfg.storage)
    enc.export_url = tokenizer
    train_in(ar, root, ar_name, cfg.storage)
    ar.data.url = tokens
    ar.method.tokenizer_export = tokenizer
    sample_from(sample, export_of(root, ar_name), join(root, "samples"), cfg.storage)
    evaluate_on(ev, export_of(root, ar_name), join(root, "samples", "samples.npz") if "sample" in steps else None,
                join(root, "eval"), cfg)
