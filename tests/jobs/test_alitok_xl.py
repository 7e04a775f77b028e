"""jobs/alitok_xl.py end to end on the tiny preset (a subprocess of the real entry point, local Ray,
CPU): stage 1 -> stage 2 -> pre-tokenize -> AR -> sample -> evaluate, each step's output in place;
a re-run skips every done step; with the last steps' outputs removed (a job killed in them) a
re-run does only those. Config errors exit 2 before Ray."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from job_runner import run_entry

TINY = "configs/experiments/alitok_tiny.yaml"
run_job = functools.partial(run_entry, "alitok_xl")


@pytest.mark.parametrize("args, message", [
    (["ar.data.url=/x"], "'ar.data.url' = '/x' differs from what the pipeline sets"),
    (["steps=[ar,stage1]"], "config key 'steps'"),
    (["stage1.method.tokenizer_overrides.num_prefix_tokens=17"], "num_prefix_tokens must be in [8, 16]"),
])
def test_config_errors_exit_2_before_ray(args, message, tmp_path):
    r = run_job("--config", TINY, f"storage_path={tmp_path}", *args, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr, r.stderr
    assert not (tmp_path / "alitok-tiny").exists()


@pytest.mark.slow
def test_tiny_pipeline_and_resume(tmp_path):
    data = tmp_path / "data"
    args = ["--config", TINY, f"storage_path={tmp_path / 'runs'}", f"images={data}/train", f"val_images={data}/val",
            "stage1.train.max_steps=6", "stage1.checkpoint.every_steps=3", "stage1.method.gan_start_step=3",
            "stage2.train.max_steps=4", "stage2.checkpoint.every_steps=2", "stage2.method.gan_start_step=2",
            "ar.train.max_steps=4", "ar.checkpoint.every_steps=2", "sample.num_per_class=2", "evaluate.pr_k=1"]
    args += [f"{s}.logging.{k}" for s in ("stage1", "stage2", "ar") for k in ("progress=false", "wandb_mode=disabled")]
    args += ["sample.progress=false", "evaluate.logging.wandb_mode=disabled"]
    r = run_job(*args, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    root = tmp_path / "runs" / "alitok-tiny"
    state = json.loads((root / "pipeline.json").read_text())["steps"]
    assert list(state) == ["stage1", "stage2", "pretokenize", "ar", "sample", "evaluate"]
    assert all(e["status"] == "done" and e["seconds"] > 0 for e in state.values()), state
    assert json.loads((root / "stage1" / "result.json").read_text())["step"] == 6
    assert json.loads((root / "stage2" / "result.json").read_text())["step"] == 4
    tokens = json.loads((root / "tokens" / "index.json").read_text())
    assert tokens["tokens"]["seq_len"] == 9 + 64 and tokens["tokens"]["tokenizer"]["url"].endswith("stage2/export")
    ar = json.loads((root / "ar" / "result.json").read_text())
    assert ar["step"] == 4 and (root / "ar" / "export" / "model.json").is_file()
    with np.load(root / "samples" / "samples.npz") as z:
        assert z["arr_0"].shape == (16, 64, 64, 3) and z["arr_0"].dtype == np.uint8
    report = json.loads((root / "eval" / "report.json").read_text())
    assert 0 <= report["reconstruction"]["ar_next_token_accuracy"] <= 1 and report["reconstruction"]["psnr"] > 0
    assert report["generation"]["num_images"] == 16
    assert "pipeline done" in r.stdout and (root / "config.yaml").is_file()

    r = run_job(*args, timeout=600)  # all done: every step skipped
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stderr.count("done before") == 6, r.stderr[-3000:]

    (root / "samples" / "samples.npz").unlink()  # killed while sampling: the parts made stay
    (root / "eval" / "report.json").unlink()
    r = run_job(*args, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stderr.count("done before") == 4 and "step 5/6 sample:" in r.stderr and "step 6/6 evaluate:" in r.stderr
    assert (root / "samples" / "samples.npz").is_file() and (root / "eval" / "report.json").is_file()
