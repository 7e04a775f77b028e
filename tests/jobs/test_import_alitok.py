"""AliTok's released checkpoint formats through the jobs: jobs/import_alitok.py writes an export of
kind "alitok-released" from torch.save'd files in the official layout (random tiny weights,
tests/alitok_layout.py), which jobs/sample.py's sampler, jobs/evaluate.py and VAπ (jobs/vapi.py's
method: config check, policy + tokenizer, rollouts, update) accept."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import evaluate  # jobs/ (tests/jobs/conftest.py puts it on sys.path)
import import_alitok
from alitok_layout import official_ar, official_tokenizer  # tests/alitok_layout.py
from system.config.eval_schema import SampleConfig
from system.eval.sample_parts import PartSampler, merge_parts
from system.eval.sampling_plan import SamplingPlan

TINY = ["preset=alitok-b", "overrides={n_head: 4, prefix_tokens: 5, block_size: 16}"]  # 32 px: 1 + 4 prefix, 4 x 4 grid


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """weights/AliTok.pth and weights/alitok_b.bin in the official layout, imported as an export."""
    d = tmp_path_factory.mktemp("released")
    torch.save(official_tokenizer(), d / "AliTok.pth")
    ar = official_ar(classes=8)
    torch.nn.init.normal_(ar["output.weight"], std=0.5)
    torch.save(ar, d / "alitok_b.bin")
    argv = [f"tokenizer={d / 'AliTok.pth'}", f"ar={d / 'alitok_b.bin'}", f"out={d / 'export'}", *TINY]
    assert import_alitok.main(argv) == 0
    return d


def test_import_writes_the_official_tensors_and_refuses_leftovers(released, tmp_path, capsys):
    parts = json.loads((released / "export" / "model.json").read_text())
    assert {n: p["kind"] for n, p in parts.items()} == {"tokenizer": "alitok-released", "ar": "alitok-released"}
    bad = official_ar(classes=8)
    bad["blocks.0.attn.extra"] = torch.zeros(2)
    torch.save(bad, tmp_path / "bad.bin")
    with pytest.raises(SystemExit) as e:
        import_alitok.main([f"tokenizer={released / 'AliTok.pth'}", f"ar={tmp_path / 'bad.bin'}", f"out={tmp_path / 'x'}", *TINY])
    assert e.value.code == 2 and "not used: ['blocks.0.attn.extra']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_sample_and_evaluate_accept_it(released, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # evaluate builds the embedded val shards under ./.cache
    export = str(released / "export")
    plan = SamplingPlan(num_per_class=2, num_classes=2, part_size=4, seed=0)
    sampler = PartSampler(SampleConfig(export_url=export, batch_size=4, cfg_scale=16.0, cfg_schedule="power-cosine",
                                       cfg_power=1.8))  # AliTok-B's official CFG
    images, codes = sampler.sample(plan.part(0))
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8 and codes.shape == (4, 21)
    for part in plan.parts():
        sampler.write_part(part, str(tmp_path / "samples"))
    npz = merge_parts(str(tmp_path / "samples"), plan)
    assert evaluate.main([f"samples={npz}", f"export_url={export}", "max_images=8", "batch_size=8", "pr_k=3"]) == 0
    report = json.loads((tmp_path / "samples/eval/report.json").read_text())
    assert report["generation"]["num_images"] == 4 and report["reconstruction"]["resolution"] == 32
    assert np.isfinite(report["reconstruction"]["psnr"]) and report["reconstruction"]["codebook_size"] == 64


def test_vapi_accepts_it(released):
    from system.config import VapiConfig
    from system.methods.base import DataSpec
    from system.methods.vapi import VapiMethod, load_parts, rollout, rollout_config, vapi_loss

    cfg = VapiConfig(export_url=str(released / "export"), w_lpips=0.0, group_size=2)
    VapiMethod.check(cfg, DataSpec(32, 8))  # what jobs/vapi.py checks before Ray
    policy, tok, _ = load_parts(cfg.export_url, use_lpips=False)
    assert not policy.masked and tok.unread_prefix == 0 and policy.prefix_tokens == tok.prefix_tokens == 5
    rcfg = rollout_config(cfg)
    ro = rollout(policy, tok, None, torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([1, 2]), torch.arange(2), rcfg,
                 torch.Generator().manual_seed(0))
    loss, _ = vapi_loss(policy, ro, rcfg.grpo)
    loss.backward()
    assert ro.tokens.shape == (4, 21) and policy.ar.output.weight.grad is not None
