"""Config of a multi-step pipeline job (jobs/alitok_xl.py, jobs/semtok.py): one typed section per step, each the
schema of the job that step is on its own, and the keys that chain the steps (run folders, the
URLs one step hands the next) set by the pipeline.

Loading: each section starts from its own job's default files (`SECTION_DEFAULTS`, then the
config's `section_configs`), then the pipeline's files and `key=value` overrides apply, then the
wiring fills the chaining keys. A chaining key given by the pipeline's files or command line is an
error naming it (it would be silently replaced otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from system.config.eval_schema import EvaluateConfig, SampleConfig
from system.config.experiments import (
    AliTokStage1Experiment, AliTokStage2Experiment, ARExperiment, LatentCacheConfig, LatentVAEExperiment, MaskedARExperiment,
    PretokenizeConfig, SemTokStage1Experiment, SemTokStage2Experiment)
from system.config.load import (
    ConfigError, HelpRequested, _explain, _load_yaml, config_path, exit_on_config_error, finish_config, help_text,
    parse_argv)
from system.config.sections import StorageConfig

ALITOK_STEPS = ("stage1", "stage2", "pretokenize", "ar", "sample", "evaluate")


@dataclass
class AliTokPipelineConfig:
    """jobs/alitok_xl.py: AliTok stage 1 -> stage 2 -> pre-tokenize -> AR -> sample -> evaluate.
    Everything lands under <storage_path>/<run_name>/: stage1/, stage2/, tokens/, ar/, samples/,
    eval/ and pipeline.json (each step's status, time and summary)."""

    run_name: str = "alitok-xl"  # the pipeline's folder under storage_path; its training runs are <run_name>/stage1 ...
    storage_path: str = "runs"  # local folder (shared by every node) or s3://bucket/prefix
    images: str = "s3://bucket/imagenet/train"  # image shard set (jobs/make_shards.py) the tokenizer and the AR learn from
    val_images: Optional[str] = "s3://bucket/imagenet/val"  # held-out image shards: tokenizer validation, AR held-out accuracy, FID reference
    embedded: bool = False  # build the embedded real-photo shard sets at images / val_images when missing
    storage: StorageConfig = field(default_factory=StorageConfig)  # how every step reaches storage_path and the shards
    # the steps to run, in order; without stage2 the AR learns and decodes with the stage-1 tokenizer
    steps: list[str] = field(default_factory=lambda: list(ALITOK_STEPS))
    # more config files (relative to configs/) merged into a section after its job's defaults, e.g.
    # {stage1: [experiments/alitok_tiny_stage1.yaml]}; the pipeline's own file and overrides come after
    section_configs: dict[str, list[str]] = field(default_factory=dict)
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


def _join(a: str, *parts: str) -> str:
    return "/".join([a.rstrip("/"), *parts])


def alitok_folders(root: str) -> dict[str, str]:
    """Where each step of a pipeline rooted at `root` (<storage_path>/<run_name>) writes."""
    return {name: _join(root, name) for name in ("stage1", "stage2", "tokens", "ar", "samples", "eval")}


def _steps(cfg: DictConfig, known: tuple[str, ...]) -> list[str]:
    steps = list(cfg.steps)
    bad = [s for s in steps if s not in known]
    if bad or len(set(steps)) != len(steps) or steps != [s for s in known if s in steps]:
        raise ConfigError(f"config key 'steps' = {steps}: a subset of {list(known)} in that order, each once")
    return steps


def _chain(cfg: DictConfig, f: dict[str, str], root: str, steps: list[str], image_steps: tuple[str, ...],
           tokenizer: str) -> dict[str, Any]:
    """The chaining keys every tokenizer -> AR pipeline shares: each training section's run folder
    and storage, the image shards of the tokenizer steps, pre-tokenize -> AR -> sample -> evaluate
    with `tokenizer` (an export URL)."""
    storage = OmegaConf.to_container(cfg.storage)
    ar_export = _join(f["ar"], "export")
    out: dict[str, Any] = {}
    for s in (*image_steps, "ar"):
        out.update({f"{s}.run_name": s, f"{s}.checkpoint.storage_path": root, f"{s}.data.storage": storage})
    for s in image_steps:
        out.update({f"{s}.data.url": cfg.images, f"{s}.data.val_url": cfg.val_images, f"{s}.data.embedded": cfg.embedded})
    out.update({
        "pretokenize.src": cfg.images, "pretokenize.out": f["tokens"], "pretokenize.export_url": tokenizer,
        "pretokenize.storage": storage,
        "ar.data.url": f["tokens"], "ar.method.tokenizer_export": tokenizer,
        "sample.export_url": ar_export, "sample.out": f["samples"], "sample.storage": storage,
        "evaluate.export_url": ar_export, "evaluate.shards": cfg.val_images or cfg.images,
        "evaluate.embedded": cfg.embedded, "evaluate.out": f["eval"], "evaluate.storage": storage,
        "evaluate.samples": _join(f["samples"], "samples.npz") if "sample" in steps else None,
    })
    return out


def alitok_wiring(cfg: DictConfig) -> dict[str, Any]:
    """The chaining keys (dotted key -> value) of a merged pipeline tree."""
    steps = _steps(cfg, ALITOK_STEPS)
    root = _join(cfg.storage_path, cfg.run_name)
    f = alitok_folders(root)
    tokenizer = _join(f["stage2" if "stage2" in steps else "stage1"], "export")
    out = _chain(cfg, f, root, steps, ("stage1", "stage2"), tokenizer)
    out["stage2.method.stage1_export"] = _join(f["stage1"], "export")
    return out


# --------------------------------------------------------------------------- SemTok
SEMTOK_STEPS = ("vae", "latents", "stage1", "stage2", "pretokenize", "ar", "sample", "evaluate")
SEMTOK_OPTIONAL = ("vae", "latents")  # not run unless listed in `steps`


@dataclass
class SemTokPipelineConfig:
    """jobs/semtok.py: [vae ->] [latents ->] SemTok stage I -> stage II -> pre-tokenize -> masked AR ->
    sample -> evaluate. Everything lands under <storage_path>/<run_name>/: vae/, latents/, stage1/,
    stage2/, tokens/, ar/, samples/, eval/ and pipeline.json. The vae step (a small VAE fitted to the
    images) is only for where SD3.5's VAE cannot be had (the CPU demo); with it, stage I reads that
    VAE. The latents step caches every view's VAE latents (a map pool) and both stages train on that
    cache instead of running the VAE every step."""

    run_name: str = "semtok"
    storage_path: str = "runs"  # local folder (shared by every node) or s3://bucket/prefix
    images: str = "s3://bucket/imagenet/train"  # image shard set (jobs/make_shards.py)
    val_images: Optional[str] = "s3://bucket/imagenet/val"  # held-out image shards: validation, FID reference
    embedded: bool = False  # build the embedded real-photo shard sets at images / val_images when missing
    storage: StorageConfig = field(default_factory=StorageConfig)
    # the steps to run, in order; without stage2 the AR decodes with the stage I tokenizer (flow sampler)
    steps: list[str] = field(default_factory=lambda: [s for s in SEMTOK_STEPS if s not in SEMTOK_OPTIONAL])
    section_configs: dict[str, list[str]] = field(default_factory=dict)  # more files per section, as AliTok's
    vae: LatentVAEExperiment = field(default_factory=LatentVAEExperiment)  # the demo's VAE (method latent_vae)
    latents: LatentCacheConfig = field(default_factory=LatentCacheConfig)  # the latent cache (cluster/latent_pool.py)
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


def semtok_folders(root: str) -> dict[str, str]:
    return {name: _join(root, name) for name in ("vae", "latents", "stage1", "stage2", "tokens", "ar", "samples", "eval")}


def semtok_wiring(cfg: DictConfig) -> dict[str, Any]:
    steps = _steps(cfg, SEMTOK_STEPS)
    root = _join(cfg.storage_path, cfg.run_name)
    f = semtok_folders(root)
    tokenizer = _join(f["stage2" if "stage2" in steps else "stage1"], "export")
    out = _chain(cfg, f, root, steps, ("vae", "stage1", "stage2"), tokenizer)
    out["stage2.method.stage1_export"] = _join(f["stage1"], "export")
    vae = OmegaConf.to_container(cfg.stage1.method.vae)
    if "vae" in steps:  # stage I reads the fitted VAE (and nothing else)
        vae.update(export=_join(f["vae"], "export"), path=None, hub_name=None, random_init=False)
        out.update({f"stage1.method.vae.{k}": vae[k] for k in ("export", "path", "hub_name", "random_init")})
    out.update({f"latents.vae.{k}": v for k, v in vae.items()})  # the cache of stage I's VAE
    out.update({"latents.src": cfg.images, "latents.out": f["latents"], "latents.resolution": cfg.stage1.data.resolution,
                "latents.storage": OmegaConf.to_container(cfg.storage)})
    if "latents" in steps:  # both stages train on the cache
        out.update({"stage1.data.url": f["latents"], "stage2.data.url": f["latents"]})
    return out


_ABSENT = object()


def load_pipeline_config(schema: type, argv: Sequence[str], defaults: Sequence[str],
                         section_defaults: dict[str, list[str]], wiring: Any) -> Any:
    """The typed pipeline config (see module doc): sections from their jobs' defaults and
    `section_configs`, then `defaults` and the command line (`--config FILE`, `key=value`), then
    `wiring(tree)`'s chaining keys, which the files and command line must not set."""
    files, overrides = parse_argv(argv)
    try:
        user = OmegaConf.create({})
        for path in [*(config_path(d) for d in defaults), *files]:
            user = OmegaConf.merge(user, _load_yaml(path))
        if overrides:
            user = OmegaConf.merge(user, OmegaConf.from_dotlist(overrides))
        cfg = OmegaConf.structured(schema)
        extra = OmegaConf.to_container(user.get("section_configs", OmegaConf.create({})))
        for section in {**section_defaults, **extra}:
            for path in [*section_defaults.get(section, []), *extra.get(section, [])]:
                if section not in cfg:
                    raise ConfigError(f"config key 'section_configs.{section}': no such section; sections: "
                                      f"{', '.join(k for k in cfg if OmegaConf.is_config(cfg[k]))}")
                cfg = OmegaConf.merge(cfg, {section: _load_yaml(config_path(path))})
        cfg = OmegaConf.merge(cfg, user)
        wired = wiring(cfg)
        clash = sorted(k for k in wired if OmegaConf.select(user, k, default=_ABSENT) is not _ABSENT)
        if clash:
            raise ConfigError(f"config key '{clash[0]}' is set by the pipeline (to {wired[clash[0]]!r}); remove it"
                              + (f" (and {', '.join(clash[1:])})" if clash[1:] else ""))
        for k, v in wired.items():
            OmegaConf.update(cfg, k, v, merge=isinstance(v, dict))
    except OmegaConfBaseException as e:
        raise _explain(schema, e) from None
    return finish_config(schema, cfg)


def pipeline_cli_config(schema: type, argv: Sequence[str], defaults: Sequence[str],
                        section_defaults: dict[str, list[str]], wiring: Any) -> Any:
    """`load_pipeline_config` for a job's command line: `--help` prints the keys; a bad config
    prints `config error: ...` and exits 2 before any Ray resource is touched."""
    try:
        return exit_on_config_error(lambda: load_pipeline_config(schema, argv, defaults, section_defaults, wiring))
    except HelpRequested:
        print(help_text(schema, list(defaults)))
        raise SystemExit(0) from None
