"""Pipeline configs (system/config/pipelines.py + the typed wiring of system/pipelines/): sections
start from their jobs' defaults, the pipeline chains the steps' URLs, a chaining key the user sets to
another value is an error naming it, the same value is accepted, and a saved config loads again."""
from __future__ import annotations

import pytest

from system.config import ConfigError, to_dict, to_yaml
from system.config.pipelines import AliTokPipelineConfig, SemTokPipelineConfig
from system.pipelines.alitok import ALITOK
from system.pipelines.eostok import EOSTOK
from system.pipelines.semtok import SEMTOK


def _load(*argv: str) -> AliTokPipelineConfig:
    return ALITOK.load(list(argv))


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
    assert (cfg.sample.cfg_schedule, cfg.sample.cfg_scale, cfg.sample.cfg_power) == ("power-cosine", 13.0, 1.4)  # XL's official
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
    (["ar.data.url=/x"], "'ar.data.url' = '/x' differs from what the pipeline sets"),
    (["stage2.method.stage1_export=/x"], "'stage2.method.stage1_export' = '/x' differs from what the pipeline sets"),
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
    return SEMTOK.load(list(argv))


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
    (["steps=[latents,stage1]", "latents.vae.path=/x"], "'latents.vae.path' = '/x' differs from what the pipeline sets"),
    (["stage1.method.vae.export=/x", "steps=[vae,stage1]"], "'stage1.method.vae.export' = '/x' differs from what the pipeline sets"),
    (["steps=[stage1,vae]"], "config key 'steps'"),
    (["stage1.method.nope=1"], "stage1.method.nope"),
])
def test_semtok_config_errors_name_the_key(argv, match):
    with pytest.raises(ConfigError, match=match):
        _semtok(*argv)


# --------------------------------------------------------------------------- every pipeline
@pytest.mark.parametrize("pipeline,argv", [
    (ALITOK, ["--config", "configs/experiments/alitok_tiny.yaml"]), (ALITOK, []),
    (SEMTOK, ["--config", "configs/experiments/semtok_tiny.yaml"]), (SEMTOK, ["stage1.method.vae.path=/models/sd3.5"]),
    (EOSTOK, ["--config", "configs/experiments/eostok_pipeline_tiny.yaml"]), (EOSTOK, []),
])
def test_saved_config_loads_again_and_wiring_values_equal_to_the_pipelines_are_accepted(tmp_path, pipeline, argv):
    cfg = pipeline.load([*argv, f"storage_path={tmp_path}"])
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))  # what run_pipeline_job saves beside the run
    assert to_dict(pipeline.load(["--config", str(saved)])) == to_dict(cfg)
    same = pipeline.load([*argv, f"storage_path={tmp_path}", f"evaluate.out={cfg.evaluate.out}"])
    assert same.evaluate.out == cfg.evaluate.out
    with pytest.raises(ConfigError, match="'evaluate.out' = '/elsewhere' differs from what the pipeline sets"):
        pipeline.load(["--config", str(saved), "evaluate.out=/elsewhere"])


def test_eostok_pipeline_chains_joint_training_baselines_and_vapi(tmp_path):
    cfg = EOSTOK.load([f"storage_path={tmp_path}", "run_name=e"])
    root = f"{tmp_path}/e"
    joint = f"{root}/eostok/export"
    assert cfg.eostok.run_name == "eostok" and cfg.eostok.checkpoint.storage_path == root
    assert cfg.eostok.method.model.ar == "eostok-h" and cfg.eostok.data.url == cfg.images  # eostok_h's defaults
    assert cfg.pretokenize.export_url == cfg.baseline.method.tokenizer_export == cfg.vapi.method.export_url == joint
    assert cfg.pretokenize.augment == "ten-crop" and cfg.baseline.data.url == cfg.pretokenize.out == f"{root}/tokens"
    assert {k: r.model for k, r in cfg.baseline.runs.items()} == {"s": "eostok-s", "l": "eostok-l"}
    assert cfg.vapi.data.resolution == cfg.eostok.data.resolution == 256 and cfg.vapi.data.url == cfg.images
    assert cfg.sample_before.export_url == cfg.evaluate_before.export_url == joint
    assert cfg.sample.export_url == cfg.evaluate.export_url == f"{root}/vapi/export"
    assert cfg.evaluate_before.samples == f"{root}/samples_before/samples.npz"
    assert cfg.evaluate.samples == f"{root}/samples/samples.npz"
    steps = EOSTOK.steps(cfg)
    assert [s.name for s in steps] == list(cfg.steps)
    assert steps[2].marker == f"{root}/baseline-l/result.json"  # the last of the side-by-side runs
    short = EOSTOK.load([f"storage_path={tmp_path}", "steps=[eostok,vapi,evaluate]"])
    assert short.evaluate.samples is None  # no sample step: reconstruction metrics only
