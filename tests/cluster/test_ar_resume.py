"""A killed AR worker (Ray Train, 2 CPU ranks, DeepSpeed ZeRO-2, SemTok-style masked AR with a
bitwise head: random masks, dropout and class dropout all draw from the RNG) -> the pool restarts
from the last checkpoint and ends bit-identical to an uninterrupted run, with every token sample of
the epoch drawn exactly once at the same step on the same rank."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from ar_fixtures import ray_local  # noqa: F401 (fixture)

N = 16  # 2 ranks x batch 2 -> 4 steps per epoch
pytestmark = pytest.mark.slow


def train(tmp_path: Path, tokens: str, name: str, *over: str):
    from ar_fixtures import KeyLoggingTokens
    from cluster.training import resolve_job, run_training
    from system.config import MaskedARExperiment, load_config

    exp = load_config(MaskedARExperiment, [
        f"run_name={name}", f"data.url={tokens}", "data.batch_size=2", "data.num_workers=0", "method.model=semtok-ar-l",
        "method.overrides={n_layer: 2, dim: 32, n_head: 4, mlp_multiple_of: 32, token_dropout: 0.1}",
        "method.ema_decay=0.9", "cluster.num_workers=2", "cluster.device=cpu", "cluster.max_failures=0",
        f"checkpoint.storage_path={tmp_path}", "checkpoint.every_steps=2", "checkpoint.keep_last=1", "train.max_steps=4",
        "optim.lr=0.003", "optim.warmup_steps=1", "deepspeed.zero_stage=2", "logging.wandb_mode=disabled",
        "logging.log_every=1", "logging.progress=false", *over,
    ])
    return run_training(exp, resolve_job(exp, source=KeyLoggingTokens(str(tmp_path / f"keys_{name}"))))


def test_killed_masked_ar_worker_resumes_with_nothing_lost_or_doubled(ray_local, tmp_path):
    from ar_fixtures import key_log, write_tokens
    from system.models.artifacts import load_part

    tokens = write_tokens(str(tmp_path / "tokens"), n=N)
    assert train(tmp_path, tokens, "plain").step == 4
    res = train(tmp_path, tokens, "crash", "fault.crash_at_step=3", "fault.crash_rank=1", "cluster.max_failures=1")
    assert res.step == 4
    assert (tmp_path / "crash" / "fault" / "crash_at_step_00000003.json").is_file()  # the worker did die
    assert json.loads((tmp_path / "crash" / "metrics.json").read_text())["start_step"] == 2  # resumed at step 2

    for part in ("ar", "ar_ema"):
        a = load_part(str(tmp_path / "plain" / "export"), part, ema=False)
        b = load_part(str(tmp_path / "crash" / "export"), part, ema=False)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), f"{part}: crash + resume differs"
    rows = [json.loads(x) for x in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and {"acc", "bit_acc", "mask_ratio", "tokens_per_s"} <= set(rows[-1])

    want, got = key_log(tmp_path / "keys_plain"), key_log(tmp_path / "keys_crash")
    assert got == want  # same batches at the same steps on the same ranks
    seen = Counter(k for keys in got.values() for k in keys)
    assert len(seen) == N and set(seen.values()) == {1}  # one epoch: every sample exactly once
    attempts = [json.loads(x)["step"] for x in (tmp_path / "keys_crash" / "keys_rank1.jsonl").read_text().splitlines()]
    assert attempts == [0, 1, 2, 2, 3]  # step index 2 ran twice: before the crash and after the resume
