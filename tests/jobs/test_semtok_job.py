"""jobs/semtok.py end to end on the tiny preset (a subprocess of the real entry point, local Ray,
CPU): vae -> latent cache -> stage I -> stage II (both on the cached latents) -> pre-tokenize ->
masked AR -> sample -> evaluate, each step's output in place; a re-run skips every done step.
Config errors exit 2 before Ray."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from job_runner import run_entry

TINY = "configs/experiments/semtok_tiny.yaml"
run_job = functools.partial(run_entry, "semtok")


@pytest.mark.parametrize("args, message", [
    (["ar.data.url=/x"], "'ar.data.url' = '/x' differs from what the pipeline sets"),
    (["steps=[ar,stage1]"], "config key 'steps'"),
    (["stage1.method.tokenizer=semtok-99"], "config key 'stage1.method.tokenizer' = 'semtok-99'"),  # the key as typed
    (["stage1.method.teacher.random_init=false"], "method.teacher (SigLIP) has no weights"),
])
def test_config_errors_exit_2_before_ray(args, message, tmp_path):
    r = run_job("--config", TINY, f"storage_path={tmp_path}", *args, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr, r.stderr
    assert not (tmp_path / "semtok-tiny").exists()


@pytest.mark.slow
def test_tiny_pipeline_and_resume(tmp_path):
    data = tmp_path / "data"
    args = ["--config", TINY, f"storage_path={tmp_path / 'runs'}", f"images={data}/train", f"val_images={data}/val",
            "steps=[vae,latents,stage1,stage2,pretokenize,ar,sample,evaluate]", "latents.num_actors=1",
            "latents.cluster.device=cpu", "vae.train.max_steps=4", "vae.checkpoint.every_steps=2",
            "stage1.train.max_steps=4", "stage1.checkpoint.every_steps=2", "stage1.train.val_max_images=8",
            "stage2.train.max_steps=4", "stage2.checkpoint.every_steps=2", "stage2.train.val_max_images=8",
            "stage2.method.gan=0.1", "stage2.method.gan_start_step=2",
            "ar.train.max_steps=4", "ar.checkpoint.every_steps=2", "sample.num_per_class=2", "evaluate.pr_k=1"]
    args += [f"{s}.logging.{k}" for s in ("vae", "stage1", "stage2", "ar") for k in ("progress=false", "wandb_mode=disabled")]
    args += ["sample.progress=false", "evaluate.logging.wandb_mode=disabled"]
    r = run_job(*args, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    root = tmp_path / "runs" / "semtok-tiny"
    state = json.loads((root / "pipeline.json").read_text())["steps"]
    assert list(state) == ["vae", "latents", "stage1", "stage2", "pretokenize", "ar", "sample", "evaluate"]
    assert all(e["status"] == "done" and e["seconds"] > 0 for e in state.values()), state
    for step in ("vae", "stage1", "stage2"):
        assert json.loads((root / step / "result.json").read_text())["step"] == 4
    latents = json.loads((root / "latents" / "index.json").read_text())
    assert latents["num_samples"] == 2 * 512 and latents["latents"]["channels"] == 16  # every photo and its mirror
    for step in ("stage1", "stage2"):  # both stages trained on the cache
        assert f"  url: {root}/latents\n" in (root / step / "config.yaml").read_text()
    part = json.loads((root / "stage2" / "export" / "model.json").read_text())["tokenizer"]
    assert part["kind"] == "semtok" and part["config"]["decode_mode"] == "refiner"
    assert part["config"]["vae"]["latent_channels"] == 16
    tokens = json.loads((root / "tokens" / "index.json").read_text())["tokens"]
    assert (tokens["seq_len"], tokens["vocab_size"], tokens["dtype"]) == (32, 2**18, "int32")
    assert json.loads((root / "ar" / "result.json").read_text())["step"] == 4
    with np.load(root / "samples" / "samples.npz") as z:
        assert z["arr_0"].shape == (16, 64, 64, 3) and z["arr_0"].dtype == np.uint8
    rec = json.loads((root / "eval" / "report.json").read_text())["reconstruction"]
    assert rec["bits_per_pixel"] == pytest.approx(18 * 32 / 64**2) and rec["psnr"] > 0
    assert 0 <= rec["ar_masked_token_accuracy"] <= 1 and "ar_next_token_accuracy" not in rec
    assert "pipeline done" in r.stdout

    r = run_job(*args, timeout=600)  # all done: every step skipped
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stderr.count("done before") == 8, r.stderr[-3000:]
