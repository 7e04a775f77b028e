"""--dry-run (system/pipelines/dry_run.py) over every shipped configuration: each step of every job
and pipeline, paper sizes and tiny demos, checked and planned on fake tensors without a GPU, data or
weights; the plans are sane (memory per rank, FLOPs, time); a wiring mismatch between steps is a
config error naming the step and keys, found before the first step."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from system.config import ConfigError
from system.config.load import CONFIG_DIR
from system.pipelines.catalog import shipped
from system.pipelines.dry_run import Walk, check_steps, plan_steps, plan_table

ENTRIES = {e.name: e for e in shipped()}


# sampling settings per model size for exports made elsewhere (released weights: jobs/import_alitok.py):
# no shipped step list makes their export, so they are loaded and checked here instead of planned
SAMPLING_ONLY = {f"experiments/alitok_sample_{s}.yaml" for s in ("b", "l", "xl")} | {
    f"experiments/semtok_sample_{s}.yaml" for s in ("xl", "xxl")}


def test_every_experiment_yaml_is_planned_by_a_shipped_entry():
    read = {f for e in ENTRIES.values() for f in e.files}
    shipped_files = {f"experiments/{p.name}" for p in (CONFIG_DIR / "experiments").glob("*.yaml")}
    assert shipped_files - read - SAMPLING_ONLY == set(), "YAMLs no dry run reads"


@pytest.mark.parametrize("name", sorted(SAMPLING_ONLY))
def test_sampling_only_yamls_load_and_check(name):
    from system.config import load_config
    from system.config.eval_schema import SampleConfig, check_sample_config

    cfg = load_config(SampleConfig, ["export_url=/planned/export"], ["sample.yaml", name])
    check_sample_config(cfg)
    assert cfg.cfg_scale > 1.0, name


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """Every entry planned once (module scope: the sweep's wall time is the suite's)."""
    out, t0 = {}, time.perf_counter()
    for name, e in ENTRIES.items():
        walk = Walk()
        out[name] = (plan_steps(e.steps(str(tmp_path_factory.mktemp("plan"))), walk), walk)
    out["_seconds"] = time.perf_counter() - t0
    return out


def test_every_shipped_configuration_plans(plans):
    for name in ENTRIES:
        steps, walk = plans[name]
        assert steps, name
        text = plan_table(name, steps, walk)
        for p in steps:
            if p.kind == "train":
                assert p.row["params"] > 0 and p.row["gb_rank"] > 0 and p.row["tflop_step"] > 0, (name, p.step)
                assert p.row["gpu_h"] > 0 and p.detail["memory"]["total"] > 0, (name, p.step)
            if p.kind == "encode":
                assert p.row["views"] > 0 and p.row["shards_gb"] > 0, (name, p.step)
        assert all(p.step in text for p in steps)
    print(f"dry run of {len(ENTRIES)} shipped configurations: {plans['_seconds']:.1f} s")


def test_paper_pipelines_plan_every_step_at_paper_size(plans):
    steps = {p.step: p for p in plans["alitok (paper)"][0]}
    assert list(steps) == ["stage1", "stage2", "pretokenize", "ar", "sample", "evaluate"]
    assert 300e6 < steps["stage1"].row["params"] < 500e6  # ViT 768/12 encoder + 1024/24 decoder
    assert 600e6 < steps["ar"].row["params"] < 700e6  # alitok-xl (662M published)
    semtok = {p.step: p for p in plans["semtok (paper)"][0]}
    assert semtok["stage1"].row["params"] > 2.2e9  # the SD3.5-Medium-shaped decoder is trained
    eostok = {p.step: p for p in plans["eostok pipeline (paper)"][0]}
    assert {"eostok", "baseline-s", "baseline-l", "vapi"} <= set(eostok)
    assert eostok["pretokenize"].row["views"] == 1_281_167 * 10  # ten-crop of the assumed ImageNet train
    notes = [n for p in plans["eostok-h"][0] for n in p.notes]
    assert any("not set" in n and "lpips" in n.lower() for n in notes), notes  # paths a real run needs, listed


def test_the_tiny_demo_reads_the_embedded_set_not_an_assumed_imagenet(plans):
    steps, walk = plans["eostok pipeline (tiny)"]
    assert not walk.assumed, walk.assumed
    enc = next(p for p in steps if p.kind == "encode")
    assert enc.row["views"] == 2 * 512  # the embedded train set, flipped


def test_prefix_mismatch_between_tokenizer_and_ar_is_found_before_the_first_step(tmp_path):
    from system.pipelines.alitok import ALITOK

    cfg = ALITOK.load(["--config", "configs/experiments/alitok_tiny.yaml", f"storage_path={tmp_path}",
                       "ar.method.overrides.prefix_tokens=8"])  # the tokenizer writes 9 prefix codes
    with pytest.raises(ConfigError) as e:
        check_steps(ALITOK.steps(cfg))
    msg = str(e.value)
    assert msg.startswith("step ar:") and "'ar.method.model'" in msg and "num_prefix_tokens = 9" in msg
    assert "prefix_tokens=9" in msg and "pretokenize" in msg
    assert not (tmp_path / "alitok-tiny").exists()  # nothing written


def test_a_config_that_does_not_fit_says_what_would(plans):
    over = [p for name in ENTRIES for p in plans[name][0] if p.kind == "train" and p.row.get("fits_h100", "").startswith("NO")]
    for p in over:  # every plan over an H100's memory names settings, each re-evaluated
        assert p.detail["suggestions"], p.step
        assert any(n.startswith("does not fit") for n in p.notes)
