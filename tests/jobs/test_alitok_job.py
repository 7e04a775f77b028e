"""jobs/alitok.py end to end (subprocesses of the real entry point, local Ray, 2 CPU workers, gloo):
the tiny stage 1, then stage 2 on its export; config errors exit 2 naming the key, before Ray."""
from __future__ import annotations

import functools
import json

import pytest
import torch

from job_runner import run_entry

TINY1 = "configs/experiments/alitok_tiny_stage1.yaml"
TINY2 = "configs/experiments/alitok_tiny_stage2.yaml"
run_job = functools.partial(run_entry, "alitok")


@pytest.mark.parametrize("args, message", [
    (["--config", TINY1, "train.max_step=3"], "unknown config key 'train.max_step'"),
    (["--config", TINY1, "stage=3"], "config key 'stage'"),
    (["--config", TINY1, "method.tokenizer_overrides.num_prefix_tokens=17"], "num_prefix_tokens must be in [8, 16]"),
    (["--config", TINY2, "method.stage1_export=/nonexistent/export"], "method.stage1_export = '/nonexistent/export'"),
    (["stage=2", "data.url=/x", "method.stage1_export=/nonexistent/export"], "config key 'data.url'"),
])
def test_config_errors_exit_2_before_ray(args, message, tmp_path):
    r = run_job(*args, f"checkpoint.storage_path={tmp_path}", timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr, r.stderr
    assert not (tmp_path / "alitok-tiny-stage1").exists()  # nothing started, nothing written


@pytest.mark.slow
def test_tiny_stage1_then_stage2(tmp_path):
    from safetensors.torch import load_file

    from system.models.artifacts import read_model_json
    from system.models.tokenizers import load_tokenizer

    data = tmp_path / "data"
    common = [f"checkpoint.storage_path={tmp_path / 'runs'}", f"data.url={data}/train", f"data.val_url={data}/val",
              "train.max_steps=4", "checkpoint.every_steps=2", "logging.log_every=1", "train.sample_grid=2",
              "logging.progress=false", "logging.wandb_mode=disabled", "method.gan_start_step=2"]
    r1 = run_job("--config", TINY1, *common)
    assert r1.returncode == 0, r1.stdout[-4000:] + r1.stderr[-4000:]
    run1 = tmp_path / "runs" / "alitok-tiny-stage1"
    exp1 = run1 / "export"
    assert "stage 1 done" in r1.stdout and f"method.stage1_export={exp1}" in r1.stdout
    part = read_model_json(str(exp1))["tokenizer"]
    assert part["kind"] == "tokenizer1d" and part["config"]["decoder_causal"] is True
    assert part["config"]["num_prefix_tokens"] == 9 and part["config"]["quantizer"]["cluster_decay"] == 0
    res1 = json.loads((run1 / "result.json").read_text())
    m = res1["metrics"]
    assert res1["stage"] == 1 and res1["step"] == 4 and 0 < m["codebook_usage"] <= 1 and "loss/aux_l2" in m
    assert "disc/gan/d_loss" in m and 0 <= m["probe/acc"] <= 1 and (run1 / "samples" / "step_00000004.png").is_file()
    # validation ran on the 2 workers, each on its share of the val split: every image once, all codes counted
    val = res1["validation"]
    n_val = json.loads((data / "val" / "index.json").read_text())["num_samples"]
    assert val["val_start/images"] == val["val/images"] == val["val_ema/images"] == n_val
    assert 0 < val["val/codebook_usage"] <= 1 and val["val_start/psnr"] > 0
    assert res1["val_psnr_db"]["untrained"] == val["val_start/psnr"] and res1["val_psnr_db"]["trained"] == val["val/psnr"]

    r2 = run_job("--config", TINY2, *common, f"method.stage1_export={exp1}")
    assert r2.returncode == 0, r2.stdout[-4000:] + r2.stderr[-4000:]
    run2 = tmp_path / "runs" / "alitok-tiny-stage2"
    exp2 = run2 / "export"
    part = read_model_json(str(exp2))["tokenizer"]
    assert part["kind"] == "tokenizer1d" and part["config"]["decoder_causal"] is False
    assert part["config"]["num_buffer_tokens"] == 4
    res2 = json.loads((run2 / "result.json").read_text())
    assert res2["stage"] == 2 and {"stage1", "trained", "untrained"} <= set(res2["val_psnr_db"])
    # the frozen stage-1 parts come out bit for bit (stage 2 read the stage-1 EMA weights)
    s1, s2 = load_file(str(exp1 / "tokenizer_ema.safetensors")), load_file(str(exp2 / "tokenizer.safetensors"))
    frozen = [k for k in s2 if k.startswith(("encoder.", "quantizer."))]
    assert frozen and all(torch.equal(s1[k], s2[k]) for k in frozen)
    assert any(k.startswith("decoder.buffer_tokens") for k in s2)
    tok1, tok2 = load_tokenizer(str(exp1)), load_tokenizer(str(exp2))  # what jobs/pretokenize.py loads
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(tok1.encode(x), tok2.encode(x)) and tok2.encode(x).shape == (2, 73)
    assert tok2.decode(tok2.encode(x)).shape == (2, 3, 64, 64)
