"""jobs/eostok_pipeline.py end to end on its tiny preset shrunk to a few steps (a subprocess of the
real entry point, local Ray, CPU): EOSTok joint training -> pre-tokenize -> two baseline ARs side by
side -> VAπ post-training of the joint AR -> sample and evaluate before and after, with the
before/after table; a re-run skips every done step. Config errors exit 2 before Ray."""
from __future__ import annotations

import functools
import json

import pytest

from job_runner import run_entry

TINY = "configs/experiments/eostok_pipeline_tiny.yaml"
run_job = functools.partial(run_entry, "eostok_pipeline")


@pytest.mark.parametrize("args, message", [
    (["vapi.method.export_url=/x"], "'vapi.method.export_url' = '/x' differs from what the pipeline sets"),
    (["steps=[vapi,eostok]"], "config key 'steps'"),
])
def test_config_errors_exit_2_before_ray(args, message, tmp_path):
    r = run_job("--config", TINY, f"storage_path={tmp_path}", *args, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr, r.stderr
    assert not (tmp_path / "eostok-pipeline-tiny").exists()


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_then_all_skipped(tmp_path):
    data = tmp_path / "data"
    quiet = [f"{s}.logging.{k}" for s in ("eostok", "baseline", "vapi") for k in ("progress=false", "wandb_mode=disabled")]
    args = ["--config", TINY, f"storage_path={tmp_path / 'runs'}", f"images={data}/train", f"val_images={data}/val",
            "eostok.train.max_steps=4", "eostok.checkpoint.every_steps=2", "baseline.train.max_steps=2",
            "baseline.checkpoint.every_steps=2", "vapi.train.max_steps=2", "vapi.checkpoint.every_steps=2",
            "vapi.data.batch_size=2", "vapi.method.heldout_images=4", "sample_before.num_per_class=1",
            "sample.num_per_class=1", "evaluate_before.pr_k=1", "evaluate.pr_k=1", "sample_before.progress=false",
            "sample.progress=false", "evaluate_before.logging.wandb_mode=disabled", "evaluate.logging.wandb_mode=disabled",
            *quiet]
    r = run_job(*args, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    root = tmp_path / "runs" / "eostok-pipeline-tiny"
    state = json.loads((root / "pipeline.json").read_text())["steps"]
    assert list(state) == ["eostok", "pretokenize", "baseline", "vapi", "sample_before", "evaluate_before", "sample",
                           "evaluate"]
    assert all(e["status"] == "done" for e in state.values()), state
    joint = root / "eostok" / "export"
    assert json.loads((root / "eostok" / "result.json").read_text())["step"] == 4
    tokens = json.loads((root / "tokens" / "index.json").read_text())["tokens"]
    assert tokens["tokenizer"]["url"] == str(joint)
    for size in ("s", "l"):  # the two baselines, side by side on the joint tokenizer's codes
        res = json.loads((root / f"baseline-{size}" / "result.json").read_text())
        assert res["step"] == 2 and res["export"].endswith(f"baseline-{size}/export")
    vapi = state["vapi"]["summary"]
    assert vapi["heldout_start"] < 0 and vapi["heldout_end"] < 0  # VAπ measured the joint AR before and after
    assert json.loads((root / "vapi" / "result.json").read_text())["step"] == 2
    before = json.loads((root / "eval_before" / "report.json").read_text())
    after = json.loads((root / "eval" / "report.json").read_text())
    assert before["generation"]["num_images"] == after["generation"]["num_images"] == 8
    assert "before / after VAπ" in r.stdout and "held-out reward (VAπ)" in r.stdout

    r = run_job(*args, timeout=600)  # all done: every step skipped
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stderr.count("done before") == 8, r.stderr[-3000:]
