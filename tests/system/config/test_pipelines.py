"""The pipeline config (system/config/pipelines.py): sections start from their jobs' defaults, the
pipeline chains the steps' URLs, and a chaining key given by the user is an error naming it."""
from __future__ import annotations

import pytest

from system.config import ConfigError
from system.config.pipelines import (
    ALITOK_SECTION_DEFAULTS, SEMTOK_SECTION_DEFAULTS, AliTokPipelineConfig, SemTokPipelineConfig, alitok_wiring,
    load_pipeline_config, semtok_wiring)


def _load(*argv: str, defaults=("experiments/alitok_xl.yaml",)) -> AliTokPipelineConfig:
    return load_pipeline_config(AliTokPipelineConfig, list(argv), list(defaults), ALITOK_SECTION_DEFAULTS, alitok_wiring)


def test_paper_defaults_and_chaining(tmp_path):
    cfg = _load(f"storage_path={tmp_path}", "run_name=p")
    root = f"{tmp_path}/p"
    assert cfg.stage1.run_name == "stage1" and cfg.stage1.checkpoint.storage_path == root
    assert cfg.stage1.method.tokenizer == "alitok-tok-code" and cfg.stage1.data.batch_size == 48  # alitok_stage1.yaml
    assert cfg.stage2.method.stage1_export == f"{root}/stage1/export"
    assert cfg.pretokenize.export_url == cfg.ar.method.tokenizer_export == f"{root}/stage2/export"
    assert cfg.pretokenize.src == cfg.stage1.data.url == cfg.images
    assert cfg.ar.data.url == cfg.pretokenize.out == f"{root}/tokens"
    assert cfg.ar.method.model == "alitok-xl" and cfg.ar.optim.lr == 4e-4  # ar_alitok.yaml, then alitok_xl.yaml
    assert cfg.sample.export_url == cfg.evaluate.export_url == f"{root}/ar/export"
    assert (cfg.sample.cfg_schedule, cfg.sample.cfg_scale, cfg.sample.cfg_power) == ("power-cosine", 6.0, 0.7)
    assert cfg.evaluate.samples == f"{root}/samples/samples.npz" and cfg.evaluate.shards == cfg.val_images


def test_without_stage2_the_stage1_tokenizer_is_used(tmp_path):
    cfg = _load(f"storage_path={tmp_path}", "steps=[stage1,pretokenize,ar,evaluate]")
    assert cfg.ar.method.tokenizer_export.endswith("/alitok-xl/stage1/export")
    assert cfg.evaluate.samples is None


def test_tiny_preset_reads_the_stage_presets():
    cfg = _load("--config", "configs/experiments/alitok_tiny.yaml")
    assert cfg.stage1.method.tokenizer == "debug-tiny-causal" and cfg.stage1.train.max_steps == 1000 and cfg.stage1.method.aux == 10.0  # alitok_tiny_stage1.yaml, then alitok_tiny.yaml
    assert cfg.stage2.method.gan_start_step == 270 and cfg.stage2.method.gan == 0 and cfg.ar.runs == {} and cfg.ar.method.model == "debug-tiny"
    assert cfg.ar.cluster.num_workers == 1 and cfg.ar.method.overrides == {"prefix_tokens": 9, "rope": "mixed"}
    assert cfg.stage1.data.embedded and cfg.stage1.data.url.endswith(".cache/embedded_shards/train")


@pytest.mark.parametrize("argv,match", [
    (["ar.data.url=/x"], "'ar.data.url' is set by the pipeline"),
    (["stage2.method.stage1_export=/x"], "'stage2.method.stage1_export' is set by the pipeline"),
    (["steps=[stage2,stage1]"], "config key 'steps'"),
    (["steps=[stage1,train]"], "config key 'steps'"),
    (["stage1.method.nope=1"], "stage1.method.nope"),
    (["section_configs.nope=[base.yaml]"], "section_configs.nope"),
    (["section_configs.stage1=[no_such.yaml]"], "config file not found"),
])
def test_config_errors_name_the_key(argv, match):
    with pytest.raises(ConfigError, match=match):
        _load(*argv)


# --------------------------------------------------------------------------- SemTok
def _semtok(*argv: str) -> SemTokPipelineConfig:
    return load_pipeline_config(SemTokPipelineConfig, list(argv), [], SEMTOK_SECTION_DEFAULTS, semtok_wiring)


def test_semtok_paper_defaults_and_chaining(tmp_path):
    cfg = _semtok(f"storage_path={tmp_path}", "run_name=s")
    root = f"{tmp_path}/s"
    assert cfg.steps == ["stage1", "stage2", "pretokenize", "ar", "sample", "evaluate"]  # no vae step: SD3.5's VAE
    m1 = cfg.stage1.method
    assert (m1.tokenizer, m1.quant, m1.semantic, m1.sample_steps) == ("semtok-18", 0.0025, 0.05, 25)
    assert m1.vae.path is None and m1.vae.hub_name is None and m1.teacher.kind == "siglip"  # weights: the user's choice
    assert (cfg.sample.cfg_scale, cfg.sample.top_p) == (6.0, 0.75)  # semtok_sample.yaml
    assert (cfg.stage1.optim.lr, cfg.stage1.optim.weight_decay, cfg.stage1.train.max_steps) == (5e-5, 1e-3, 200000)
    assert cfg.stage1.data.batch_size * cfg.stage1.cluster.num_workers == 256
    m2 = cfg.stage2.method
    assert (m2.lpips, m2.resnet, m2.gan, m2.gan_start_step) == (0.1, 0.1, 0.1, 20000)
    assert cfg.stage2.data.batch_size * cfg.stage2.cluster.num_workers == 64 and cfg.stage2.train.max_steps == 100000
    assert m2.stage1_export == f"{root}/stage1/export"
    assert cfg.pretokenize.export_url == cfg.ar.method.tokenizer_export == f"{root}/stage2/export"
    assert cfg.ar.objective == "masked_ar" and cfg.ar.method.model == "semtok-ar-l" and cfg.ar.data.url == f"{root}/tokens"
    assert (cfg.ar.method.mask_min, cfg.ar.method.label_smoothing, cfg.ar.method.sample_top_p) == (0.7, 0.01, 0.75)
    assert cfg.evaluate.export_url == f"{root}/ar/export"


def test_semtok_tiny_fits_its_own_vae_first():
    cfg = _semtok("--config", "configs/experiments/semtok_tiny.yaml")
    assert cfg.steps[0] == "vae" and cfg.vae.method.tiny and cfg.vae.run_name == "vae"
    v = cfg.stage1.method.vae
    assert v.export.endswith("semtok-tiny/vae/export") and v.hub_name is None and v.path is None
    assert cfg.stage1.method.tokenizer == "semtok-tiny" and cfg.stage1.data.resolution == 64


def test_semtok_latent_cache_feeds_both_stages_with_stage1s_vae(tmp_path):
    cfg = _semtok("--config", "configs/experiments/semtok_tiny.yaml", f"storage_path={tmp_path}",
                  "steps=[vae,latents,stage1,stage2]")
    root = f"{tmp_path}/semtok-tiny"
    assert cfg.latents.src == cfg.images and cfg.latents.out == f"{root}/latents" and cfg.latents.resolution == 64
    assert cfg.stage1.data.url == cfg.stage2.data.url == f"{root}/latents"
    assert cfg.stage1.data.val_url == cfg.val_images  # validation encodes held-out images itself
    assert cfg.latents.vae == cfg.stage1.method.vae and cfg.latents.vae.export == f"{root}/vae/export"
    paper = _semtok(f"storage_path={tmp_path}", "steps=[latents,stage1]", "stage1.method.vae.path=/models/sd3.5")
    assert paper.latents.vae.path == paper.stage1.method.vae.path == "/models/sd3.5"
    assert paper.latents.resolution == 256


@pytest.mark.parametrize("argv,match", [
    (["steps=[latents,stage1]", "latents.vae.path=/x"], "'latents.vae.path' is set by the pipeline"),
    (["stage1.method.vae.export=/x", "steps=[vae,stage1]"], "'stage1.method.vae.export' is set by the pipeline"),
    (["steps=[stage1,vae]"], "config key 'steps'"),
    (["stage1.method.nope=1"], "stage1.method.nope"),
])
def test_semtok_config_errors_name_the_key(argv, match):
    with pytest.raises(ConfigError, match=match):
        _semtok(*argv)
