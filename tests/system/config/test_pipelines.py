"""The pipeline config (system/config/pipelines.py): sections start from their jobs' defaults, the
pipeline chains the steps' URLs, and a chaining key given by the user is an error naming it."""
from __future__ import annotations

import pytest

from system.config import ConfigError
from system.config.pipelines import (
    ALITOK_SECTION_DEFAULTS, AliTokPipelineConfig, alitok_wiring, load_pipeline_config)


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
