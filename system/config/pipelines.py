"""Config schemas of the multi-step pipeline jobs (jobs/alitok_xl.py, jobs/semtok.py,
jobs/eostok_pipeline.py): one typed section per step, each the schema of the job that step is on its
own, plus the pipeline's own keys (where it lands, its image shard sets, which steps run).

Loading (`system.config.load.load_sectioned_config`): each section starts from its own job's default
files (`*_SECTION_DEFAULTS`, then the config's `section_configs`), then the pipeline's files and
`key=value` overrides apply, then the pipeline's typed wiring (system/pipelines/) sets the keys
that join the steps (run folders, the exports and shard sets one step hands the next).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from system.config.eval_schema import EvaluateConfig, SampleConfig
from system.config.experiments import (
    AliTokStage1Experiment, AliTokStage2Experiment, ARExperiment, EOSTokExperiment, LatentCacheConfig, LatentVAEExperiment,
    MaskedARExperiment, PretokenizeConfig, SemTokStage1Experiment, SemTokStage2Experiment, VapiExperiment)
from system.config.sections import StorageConfig


@dataclass
class ImagePipelineConfig:
    """The keys every image pipeline shares."""

    run_name: str = "pipeline"  # the pipeline's folder under storage_path; its training runs are <run_name>/<step> ...
    storage_path: str = "runs"  # local folder (shared by every node) or s3://bucket/prefix
    images: str = "s3://bucket/imagenet/train"  # image shard set (jobs/make_shards.py) the tokenizer and the AR learn from
    val_images: Optional[str] = "s3://bucket/imagenet/val"  # held-out image shards: validation, AR held-out accuracy, FID reference
    embedded: bool = False  # build the embedded real-photo shard sets at images / val_images when missing
    storage: StorageConfig = field(default_factory=StorageConfig)  # how every step reaches storage_path and the shards
    # more config files (relative to configs/) merged into a section after its job's defaults, e.g.
    # {stage1: [experiments/alitok_tiny_stage1.yaml]}; the pipeline's own file and overrides come after
    section_configs: dict[str, list[str]] = field(default_factory=dict)

ALITOK_STEPS = ("stage1", "stage2", "pretokenize", "ar", "sample", "evaluate")


@dataclass
class AliTokPipelineConfig(ImagePipelineConfig):
    """jobs/alitok_xl.py: AliTok stage 1 -> stage 2 -> pre-tokenize -> AR -> sample -> evaluate.
    Everything lands under <storage_path>/<run_name>/: stage1/, stage2/, tokens/, ar/, samples/,
    eval/ and pipeline.json (each step's status, time and summary)."""

    run_name: str = "alitok-xl"  # the pipeline's folder under storage_path; its training runs are <run_name>/stage1 ...
    # the steps to run, in order; without stage2 the AR learns and decodes with the stage-1 tokenizer
    steps: list[str] = field(default_factory=lambda: list(ALITOK_STEPS))
    stage1: AliTokStage1Experiment = field(default_factory=AliTokStage1Experiment)  # jobs/alitok.py stage=1
    stage2: AliTokStage2Experiment = field(default_factory=AliTokStage2Experiment)  # jobs/alitok.py stage=2
    pretokenize: PretokenizeConfig = field(default_factory=PretokenizeConfig)  # jobs/pretokenize.py
    ar: ARExperiment = field(default_factory=ARExperiment)  # jobs/train_ar.py
    sample: SampleConfig = field(default_factory=SampleConfig)  # jobs/sample.py
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)  # jobs/evaluate.py


# each section's own job defaults (relative to configs/): paper sizes
ALITOK_SECTION_DEFAULTS: dict[str, list[str]] = {
    "stage1": ["base.yaml", "data/imagenet.yaml", "experiments/alitok_stage1.yaml"],
    "stage2": ["base.yaml", "data/imagenet.yaml", "experiments/alitok_stage2.yaml"],
    "ar": ["base.yaml", "experiments/ar_alitok.yaml"],
    "sample": ["sample.yaml"],
    "evaluate": ["evaluate.yaml"],
}


SEMTOK_STEPS = ("vae", "latents", "stage1", "stage2", "pretokenize", "ar", "sample", "evaluate")
SEMTOK_OPTIONAL = ("vae", "latents")  # not run unless listed in `steps`


@dataclass
class SemTokPipelineConfig(ImagePipelineConfig):
    """jobs/semtok.py: [vae ->] [latents ->] SemTok stage I -> stage II -> pre-tokenize -> masked AR ->
    sample -> evaluate. Everything lands under <storage_path>/<run_name>/: vae/, latents/, stage1/,
    stage2/, tokens/, ar/, samples/, eval/ and pipeline.json. The vae step (a small VAE fitted to the
    images) is only for where SD3.5's VAE cannot be had (the CPU demo); with it, stage I reads that
    VAE. The latents step caches every view's VAE latents (a map pool) and both stages train on that
    cache instead of running the VAE every step."""

    run_name: str = "semtok"
    # the steps to run, in order; without stage2 the AR decodes with the stage I tokenizer (flow sampler)
    steps: list[str] = field(default_factory=lambda: [s for s in SEMTOK_STEPS if s not in SEMTOK_OPTIONAL])
    vae: LatentVAEExperiment = field(default_factory=LatentVAEExperiment)  # the demo's VAE (method latent_vae)
    latents: LatentCacheConfig = field(default_factory=LatentCacheConfig)  # the latent cache (system/pipelines/encode.py)
    stage1: SemTokStage1Experiment = field(default_factory=SemTokStage1Experiment)  # semtok_stage1
    stage2: SemTokStage2Experiment = field(default_factory=SemTokStage2Experiment)  # semtok_stage2
    pretokenize: PretokenizeConfig = field(default_factory=PretokenizeConfig)  # jobs/pretokenize.py
    ar: MaskedARExperiment = field(default_factory=MaskedARExperiment)  # jobs/train_ar.py objective=masked_ar
    sample: SampleConfig = field(default_factory=SampleConfig)  # jobs/sample.py
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)  # jobs/evaluate.py


SEMTOK_SECTION_DEFAULTS: dict[str, list[str]] = {
    "vae": ["base.yaml", "data/imagenet.yaml", "experiments/semtok_vae.yaml"],
    "stage1": ["base.yaml", "data/imagenet.yaml", "experiments/semtok_stage1.yaml"],
    "stage2": ["base.yaml", "data/imagenet.yaml", "experiments/semtok_stage2.yaml"],
    "ar": ["base.yaml", "experiments/ar_semtok.yaml"],
    "sample": ["sample.yaml", "experiments/semtok_sample.yaml"],
    "evaluate": ["evaluate.yaml"],
}


EOSTOK_STEPS = ("eostok", "pretokenize", "baseline", "vapi", "sample_before", "evaluate_before", "sample", "evaluate")


@dataclass
class EOSTokPipelineConfig(ImagePipelineConfig):
    """jobs/eostok_pipeline.py: EOSTok joint training (tokenizer + AR) -> pre-tokenize its codes ->
    the two-stage baseline (AR sizes side by side on the frozen codes, `baseline.runs`) -> VAπ
    post-training of the jointly trained AR -> sample and evaluate before and after VAπ. Everything
    lands under <storage_path>/<run_name>/: eostok/, tokens/, baseline-<size>/, vapi/,
    samples_before/, eval_before/, samples/, eval/ and pipeline.json."""

    run_name: str = "eostok-pipeline"
    # the steps to run, in order (any subset in this order; vapi and the after-steps need eostok's export)
    steps: list[str] = field(default_factory=lambda: list(EOSTOK_STEPS))
    eostok: EOSTokExperiment = field(default_factory=EOSTokExperiment)  # jobs/eostok_h.py
    pretokenize: PretokenizeConfig = field(default_factory=PretokenizeConfig)  # jobs/pretokenize.py
    baseline: ARExperiment = field(default_factory=ARExperiment)  # jobs/train_ar.py (its runs side by side)
    vapi: VapiExperiment = field(default_factory=VapiExperiment)  # jobs/vapi.py
    sample_before: SampleConfig = field(default_factory=SampleConfig)  # jobs/sample.py on the joint export
    evaluate_before: EvaluateConfig = field(default_factory=EvaluateConfig)  # jobs/evaluate.py on it
    sample: SampleConfig = field(default_factory=SampleConfig)  # jobs/sample.py on the post-trained export
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)  # jobs/evaluate.py on it


EOSTOK_SECTION_DEFAULTS: dict[str, list[str]] = {
    "eostok": ["base.yaml", "data/imagenet.yaml", "model/eostok_h.yaml", "experiments/eostok_h.yaml"],
    "baseline": ["base.yaml", "experiments/ar_llamagen.yaml"],
    "vapi": ["data/imagenet.yaml", "experiments/vapi.yaml"],
    "sample_before": ["sample.yaml"],
    "evaluate_before": ["evaluate.yaml"],
    "sample": ["sample.yaml"],
    "evaluate": ["evaluate.yaml"],
}
