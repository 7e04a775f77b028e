"""A new user's bad inputs: every one ends in one line that names the config key, exit 2, no
traceback, before Ray starts (subprocesses of the real entry points)."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["--config", "configs/experiments/eostok_tiny.yaml"]


def run_job(job: str, *args: str, env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    e = {**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})}
    e.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, f"jobs/{job}.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=e)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> list[str]:
    from system.data.embedded import ensure_embedded_dataset

    root = tmp_path_factory.mktemp("data")
    train = ensure_embedded_dataset(str(root / "train"), split="train", per_class=4, num_shards=2)
    val = ensure_embedded_dataset(str(root / "val"), split="val", per_class=2, num_shards=1)
    return [f"data.url={train}", f"data.val_url={val}", "data.embedded=false"]


CASES = [
    ("eostok_h", ["data.url=/nonexistent/path", "data.val_url=null"], "data.url", False),
    ("eostok_h", ["data.resolution=63"], "data.resolution", True),
    ("eostok_h", ["data.url=/proc/x/train", "data.embedded=true"], "data.url", True),
    ("eostok_h", ["cluster.num_workers=64"], "cluster.num_workers", True),
    ("eostok_h", ["data.batch_size=100000"], "data.batch_size", True),
    ("eostok_h", ["run_name=a/b"], "run_name", True),
    ("eostok_h", ["run_name=my run"], "run_name", True),
    ("eostok_h", ["data.batch_size=-8"], "data.batch_size", True),
    ("eostok_h", ["checkpoint.storage_path=/proc/x"], "checkpoint.storage_path", True),
    ("eostok_h", ["cluster.max_failures=-1"], "cluster.max_failures", True),
    ("eostok_h", ["optim.lr=0"], "optim.lr", True),
    ("eostok_h", ["method.ema_decay=1.5"], "method.ema_decay", True),
    ("eostok_h", ["method.model.ar=eostok-xxl"], "method.model", True),
    ("vapi", ["method.group_size=1"], "method.group_size", True),
    ("vapi", ["data.url=/nonexistent/path", "method.export_url=/nonexistent/export"], "data.url", False),
    ("sample", ["export_url=/x", "num_per_class=0"], "num_per_class", False),
    ("evaluate", ["samples=/x.npz", "pr_k=0"], "pr_k", False),
    ("make_shards", ["src=/x", "out=/y", "shard_size=0"], "shard_size", False),
]


@pytest.mark.parametrize("job, args, key, with_data", CASES, ids=[f"{c[0]}:{c[1][-1]}" for c in CASES])
def test_bad_input_names_the_key_and_exits_2(job, args, key, with_data, embedded, tmp_path):
    base = [*TINY, *embedded, f"checkpoint.storage_path={tmp_path}/runs"] if job == "eostok_h" else []
    if job == "vapi":
        base = ["--config", "configs/experiments/vapi_tiny.yaml", *embedded, f"checkpoint.storage_path={tmp_path}/runs"]
    t = time.time()
    r = run_job(job, *base, *args)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines and lines[-1].startswith("config error:") and key in lines[-1], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Started a local Ray" not in r.stderr + r.stdout
    assert time.time() - t < 120
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), sorted(str(p) for p in runs.rglob("*"))  # nothing left


@pytest.mark.parametrize("name", ["a/b", "my run"])
def test_a_pipeline_refuses_an_unsafe_run_name(name, tmp_path):
    r = run_job("alitok_xl", "--config", "configs/experiments/alitok_tiny.yaml", f"storage_path={tmp_path}/runs",
                f"run_name={name}", timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"config error: config key 'run_name' = {name!r}")
    assert not (tmp_path / "runs").exists()


def test_help_after_config_shows_the_files_values(tmp_path):
    """`--config FILE --help` reads the file: a saved (pipeline) config can be checked with it."""
    saved = tmp_path / "config.yaml"
    saved.write_text("run_name: checked-run\nstage1:\n  train:\n    max_steps: 1234\n")
    r = run_job("alitok_xl", "--config", "configs/experiments/alitok_tiny.yaml", "--config", str(saved), "--help",
                timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"^  run_name +str = checked-run", r.stdout, re.M)
    assert re.search(r"^  stage1.train.max_steps +int = 1234", r.stdout, re.M)


def test_debug_shows_the_traceback():
    r = run_job("eostok_h", "data.url=/x", "data.batch_size=-8", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "data.batch_size" in r.stderr


def test_relative_output_under_ray_job_submit_is_refused(embedded):
    env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}})}
    r = run_job("eostok_h", *TINY, *embedded, "checkpoint.storage_path=runs", env=env)
    assert r.returncode == 2 and "checkpoint.storage_path" in r.stderr and "temporary package folder" in r.stderr


@pytest.mark.parametrize("job", ["eostok_h", "vapi", "sample", "evaluate", "make_shards", "pretokenize", "train_ar", "alitok"])
def test_help_lists_the_jobs_own_keys(job):
    r = run_job(job, "--help", timeout=60)
    assert r.returncode == 0
    out = r.stdout
    assert out.startswith(f"usage: python jobs/{job}.py")
    own = {"eostok_h": "method.model.ar", "vapi": "method.group_size", "sample": "num_per_class",
           "evaluate": "inception_path", "make_shards": "shard_size", "pretokenize": "augment",
           "train_ar": "method.tokenizer_export", "alitok": "method.aux"}[job]
    assert own in out
    if job in ("make_shards", "pretokenize"):
        assert re.search(r"^  src +str = \(required\)", out, re.M)  # not "= None"
    if job == "vapi":
        assert "method.model" not in out and "method.disc_lr" not in out  # not VAπ's keys
    if job == "eostok_h":
        assert "data.batch_size   int = 32   # [>= 1]" in out or "data.batch_size" in out


def test_vapi_refuses_a_masked_generator_before_ray(embedded, tmp_path):
    """A masked (SemTok-style, bidirectional) AR export: jobs/vapi.py stops with one line naming
    method.export_url and why (teacher-forced per-position sampling is undefined), before Ray."""
    import torch

    from system.models.artifacts import Artifact, save_export
    from system.models.gpt import GPT
    from system.models.registry import gpt_config
    from system.models.tokenizer1d import Tokenizer1D, tokenizer_config

    tc = tokenizer_config("debug-tiny")
    ar = GPT(gpt_config("debug-tiny", vocab_size=64, block_size=tc.seq_len, num_classes=8, bidirectional=True))
    with torch.no_grad():
        save_export(str(tmp_path / "masked"), {"tokenizer": Artifact.of("tokenizer1d", Tokenizer1D(tc)), "ar": Artifact.of("gpt", ar)})
    r = run_job("vapi", "--config", "configs/experiments/vapi_tiny.yaml", *embedded, f"checkpoint.storage_path={tmp_path}/runs",
                f"method.export_url={tmp_path / 'masked'}", "data.resolution=32")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    last = [x for x in r.stderr.splitlines() if x.strip()][-1]
    assert last.startswith("config error:") and "method.export_url" in last and "undefined for a masked model" in last
    assert "Started a local Ray" not in r.stderr + r.stdout and "Traceback" not in r.stderr
