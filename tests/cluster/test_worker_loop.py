"""The per-worker loop without Ray (world size 1): gradient accumulation, a resubmitted run resumes
bit-identically, mid-run sample grids, metric records; the driver refuses to overwrite a run."""
import json

import pytest
import torch
from safetensors.torch import load_file

from cluster.worker_loop import WorkerContext, train_worker
from system.config.load import load_config
from system.config.schema import ExperimentConfig
from toy_method import MemoryReaderFactory, ToyFactory


@pytest.fixture
def deterministic_flags():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def cfg_for(storage, name, *over):
    # constant LR: a run stopped at max_steps=2 and resubmitted with 4 follows the 4-step run exactly
    return load_config(ExperimentConfig, [
        f"run_name={name}", "data.url=unused", "data.resolution=8", "data.batch_size=2", f"checkpoint.storage_path={storage}",
        "checkpoint.every_steps=2", "checkpoint.keep_last=2", "train.max_steps=4", "train.ema_decay=0.9", "train.sample_every=2",
        "train.sample_grid=2", "optim.grad_accum=2", "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=0.01",
        "logging.wandb_mode=disabled", "logging.progress=false", "logging.log_every=1", "deepspeed.zero_stage=2", *over,
    ])


def run(cfg, reports=None):
    ctx = WorkerContext(0, 1, torch.device("cpu"), report=lambda m, url: reports.append((m["step"], url)) if reports is not None else None)
    return train_worker(cfg, ctx, ToyFactory(), MemoryReaderFactory(n=32))


def test_resubmission_resumes_bit_identically(dist_world1, deterministic_flags, tmp_path):
    reports = []
    out = run(cfg_for(tmp_path, "straight"), reports)
    assert out["step"] == 4 and [s for s, _ in reports] == [2, 4] and reports[-1][1].endswith("step_00000004")
    run(cfg_for(tmp_path, "split", "train.max_steps=2"))
    assert json.loads((tmp_path / "split" / "metrics.json").read_text())["step"] == 2
    out = run(cfg_for(tmp_path, "split"))  # resubmitted: continues from step 2
    assert out["step"] == 4 and json.loads((tmp_path / "split" / "metrics.json").read_text())["start_step"] == 2
    for name in ("encoder", "decoder", "encoder_ema", "decoder_ema"):
        a = load_file(tmp_path / "straight" / "export" / f"{name}.safetensors")
        b = load_file(tmp_path / "split" / "export" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    for run_name in ("straight", "split"):
        rows = [json.loads(x) for x in (tmp_path / run_name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert rows[0]["lr"] == pytest.approx(0.01)
    assert (tmp_path / "straight" / "samples" / "step_00000002.png").is_file()
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


def test_driver_refuses_to_restart_an_existing_run(dist_world1, deterministic_flags, tmp_path):
    import ray

    from cluster.train_pool import run_training

    if ray.is_initialized():
        pytest.skip("needs a process without Ray to see that nothing was allocated")
    run(cfg_for(tmp_path, "done", "train.max_steps=2", "checkpoint.export=false"))
    with pytest.raises(ValueError, match="already has a checkpoint at step 2.*checkpoint.resume=true"):
        run_training(cfg_for(tmp_path, "done", "checkpoint.resume=false"), ToyFactory())
    assert not ray.is_initialized()  # refused before any resource was allocated
