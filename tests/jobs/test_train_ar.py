"""jobs/train_ar.py end to end (subprocesses of the real entry point, local Ray, CPU): next-token AR on
a token set written with write_token_set, decoded through a tokenizer export and sampled from its own
export; masked AR with two sizes side by side; config errors exit 2 naming the key, before Ray."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from job_runner import run_entry

REPO = Path(__file__).resolve().parents[2]
L, V, CLASSES = 16, 64, 8  # the tiny export's tokenizer: 16 codes of 64, 8 classes
run_job = functools.partial(run_entry, "train_ar")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> str:
    from system.data.tokens import write_token_set

    url = str(tmp_path_factory.mktemp("tokens") / "train")
    rng = np.random.default_rng(0)
    labels = np.arange(32) % CLASSES
    codes = (labels[:, None] * 5 + np.arange(L)[None] + rng.integers(0, 2, (32, L))) % V
    write_token_set(url, codes, labels, V, num_shards=2)
    return url


def common(tokens: str, storage: Path) -> list[str]:
    return [f"data.url={tokens}", "data.batch_size=4", "data.num_workers=0", "cluster.num_workers=1", "cluster.device=cpu",
            "cluster.local_num_cpus=4", "cluster.max_failures=0", f"checkpoint.storage_path={storage}",
            "checkpoint.every_steps=4", "train.max_steps=4", "train.sample_grid=2", "optim.warmup_steps=1",
            "logging.log_every=2", "logging.wandb_mode=disabled", "logging.progress=false"]


@pytest.mark.slow
def test_next_token_end_to_end_samples_from_its_export(tokens, tiny_export, tmp_path):
    from system.models.artifacts import read_model_json
    from system.sampling.generators import load_pair

    r = run_job(*common(tokens, tmp_path), "run_name=ar1", "method.model=debug-tiny", f"method.tokenizer_export={tiny_export}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ar1" in r.stdout and "done" in r.stdout and "tokens_per_s" in r.stdout
    run = tmp_path / "ar1"
    parts = read_model_json(str(run / "export"))
    assert {k: v["kind"] for k, v in parts.items()} == {"tokenizer": "tokenizer1d", "ar": "gpt"}
    assert parts["ar"]["config"]["num_classes"] == CLASSES and parts["ar"]["config"]["block_size"] == L
    assert (run / "samples" / "step_00000004.png").is_file()  # decoded through the tokenizer export
    result = json.loads((run / "result.json").read_text())
    assert result["step"] == 4 and result["metrics"]["tokens_per_s"] > 0 and 0 <= result["metrics"]["acc"] <= 1
    tok, gen = load_pair(str(run / "export"))
    codes = gen.sample(torch.arange(4), cfg_scale=2.0, seed=0)
    assert codes.shape == (4, L) and tok.decode(codes).shape == (4, 3, 32, 32)

    again = run_job(*common(tokens, tmp_path), "run_name=ar1", "method.model=debug-tiny")
    assert again.returncode == 0 and "finished" in again.stdout and "already at step 4" in again.stderr


@pytest.mark.slow
def test_masked_two_sizes_side_by_side(tokens, tmp_path):
    tiny = "{n_layer: 2, dim: 32, n_head: 4, mlp_multiple_of: 32}"
    r = run_job(*common(tokens, tmp_path), "objective=masked_ar", "run_name=mar", "method.model=semtok-ar-l",
                f"method.overrides={tiny}", "runs.s={}", "runs.m.overrides={method.overrides: {n_layer: 3}}")
    assert r.returncode == 0, r.stdout + r.stderr
    for name, layers in (("mar-s", 2), ("mar-m", 3)):
        cfg = json.loads((tmp_path / name / "export" / "model.json").read_text())["ar"]["config"]
        assert (cfg["bidirectional"], cfg["head"], cfg["n_bits"], cfg["n_layer"]) == (True, "bitwise", 6, layers)
        assert name in r.stdout
        last = json.loads((tmp_path / name / "result.json").read_text())["metrics"]
        assert {"acc", "bit_acc", "mask_ratio"} <= set(last) and 0.7 <= last["mask_ratio"] <= 1.0


@pytest.mark.parametrize("recipe, objective, seq_len, vocab, want", [
    ("ar_llamagen.yaml", "ar", 256, 16384, dict(n_layer=12, dim=768, rope="2d", bidirectional=False)),
    ("ar_alitok.yaml", "ar", 16 + 256, 4096, dict(n_layer=24, prefix_tokens=16, block_size=256, qk_norm=True)),
    ("ar_semtok.yaml", "masked_ar", 256, 2**18, dict(n_layer=24, dim=1024, head="bitwise", n_bits=18, bidirectional=True)),
    ("ar_tiny.yaml", "ar", 32, 64, dict(n_layer=2, rope="1d")),
])
def test_recipes_size_their_presets_from_the_token_index(recipe, objective, seq_len, vocab, want):
    from cluster.multi_run import expand_runs
    from system.config import ARExperiment, MaskedARExperiment, load_config
    from system.data.sources import TokenSpec
    from system.methods.base import DataSpec
    from system.methods.ar import build_gpt_config

    schema = MaskedARExperiment if objective == "masked_ar" else ARExperiment
    argv = ["--config", str(REPO / "configs" / "experiments" / recipe), "data.url=/data/tokens", "method.tokenizer_export=null"]
    exp = load_config(schema, argv, ["base.yaml"])
    assert exp.objective == objective
    data = DataSpec(num_classes=1000, tokens=TokenSpec(seq_len=seq_len, vocab_size=vocab))
    for run in expand_runs(schema, argv, ["base.yaml"], exp).values():
        g = build_gpt_config(run.method, data, masked=objective == "masked_ar")
        assert g.seq_len == seq_len and g.vocab_size == vocab and g.num_classes == 1000
    g = build_gpt_config(exp.method, data, masked=objective == "masked_ar")
    assert {k: getattr(g, k) for k in want} == want


CASES = [
    (["data.url=/nonexistent/tokens"], "data.url"),
    (["method.model=nope"], "method.model"),
    (["method.mask_min=0.5"], "unknown config key 'method.mask_min'"),
    (["objective=masked_ar", "method.mask_min=0.9", "method.mask_max=0.8"], "method.mask_min"),
    (["data.batch_size=0"], "data.batch_size"),
    (["method.tokenizer_export=/nonexistent/export"], "method.tokenizer_export"),
    (["objective=foo"], "objective"),
    (["method.overrides={vocab_size: 3}"], "method.overrides"),
    (["run_name=r", "runs.a.model=debug-tiny", "runs.a.overrides={optim.lrr: 1}"], "runs.a: unknown config key 'optim.lrr'"),
]


@pytest.mark.parametrize("args, key", CASES)
def test_config_errors_exit_2_naming_the_key(tokens, tmp_path, args, key):
    r = run_job(*common(tokens, tmp_path), "run_name=bad", "method.model=debug-tiny", *args, timeout=180)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert err and err[-1].startswith("config error:") and key in err[-1], r.stderr
    assert "Traceback" not in r.stderr and "Started a local Ray" not in r.stderr


def test_help_lists_the_objectives_keys():
    r = run_job("objective=masked_ar", "--help", timeout=120)
    assert r.returncode == 0 and "method.mask_min" in r.stdout and "runs" in r.stdout
    r = run_job("--help", timeout=120)
    assert r.returncode == 0 and "method.tokenizer_export" in r.stdout and "method.mask_min" not in r.stdout
