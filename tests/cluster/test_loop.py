"""The one rank loop without Ray (world size 1): gradient accumulation, a resubmitted run resumes
bit-identically for a two-phase and a one-phase method added through the registry alone, mid-run
sample grids, metric records, export with model.json; the driver refuses to overwrite a run."""
import json

import pytest
import torch
from safetensors.torch import load_file

from cluster.job import TrainJob, WorkerContext
from cluster.loop import train_loop
from cluster.training import resolve_job
from system.config.load import load_config
from toy_method import MemoryReaderFactory, ToyExperiment, ToyOneExperiment


@pytest.fixture
def deterministic_flags():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


COMMON = ["data.url=unused", "data.resolution=8", "data.batch_size=2", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
          "train.max_steps=4", "train.sample_every=2", "train.sample_grid=2", "optim.grad_accum=2", "optim.warmup_steps=0",
          "optim.schedule=constant", "optim.lr=0.01", "logging.wandb_mode=disabled", "logging.progress=false",
          "logging.log_every=1", "deepspeed.zero_stage=2"]


def cfg_for(storage, name, *over, schema=ToyExperiment):
    # constant LR: a run stopped at max_steps=2 and resubmitted with 4 follows the 4-step run exactly
    return load_config(schema, [f"run_name={name}", f"checkpoint.storage_path={storage}", *COMMON, *over])


def run(exp, reports=None):
    ctx = WorkerContext(0, 1, torch.device("cpu"), report=lambda m, url: reports.append((m["step"], url)) if reports is not None else None)
    job = resolve_job(exp, source=MemoryReaderFactory(n=32))
    return train_loop(exp, ctx, job)


@pytest.mark.parametrize("schema,parts", [(ToyExperiment, ("encoder", "decoder", "encoder_ema", "decoder_ema")),
                                          (ToyOneExperiment, ("net",))])
def test_resubmission_resumes_bit_identically(dist_world1, deterministic_flags, tmp_path, schema, parts):
    reports = []
    out = run(cfg_for(tmp_path, "straight", schema=schema), reports)
    assert out["step"] == 4 and [s for s, _ in reports] == [2, 4] and reports[-1][1].endswith("step_00000004")
    run(cfg_for(tmp_path, "split", "train.max_steps=2", schema=schema))
    assert json.loads((tmp_path / "split" / "metrics.json").read_text())["step"] == 2
    out = run(cfg_for(tmp_path, "split", schema=schema))  # resubmitted: continues from step 2
    assert out["step"] == 4 and json.loads((tmp_path / "split" / "metrics.json").read_text())["start_step"] == 2
    for name in parts:
        a = load_file(tmp_path / "straight" / "export" / f"{name}.safetensors")
        b = load_file(tmp_path / "split" / "export" / f"{name}.safetensors")
        assert a and all(torch.equal(a[k], b[k]) for k in a), name
    for run_name in ("straight", "split"):
        rows = [json.loads(x) for x in (tmp_path / run_name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert rows[0]["lr"] == pytest.approx(0.01)
    model = json.loads((tmp_path / "straight" / "export" / "model.json").read_text())
    assert sorted(model) == sorted(p for p in parts if not p.endswith("_ema"))
    sessions = [json.loads(x) for x in (tmp_path / "split" / "sessions.jsonl").read_text().splitlines()]
    assert [s["start_step"] for s in sessions] == [0, 2]
    grid = tmp_path / "straight" / "samples" / "step_00000002.png"
    assert grid.is_file() == (schema is ToyExperiment)  # the one-phase toy draws no grid (contract default)
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


def test_two_phase_metrics_are_named_per_phase(dist_world1, deterministic_flags, tmp_path):
    run(cfg_for(tmp_path, "m", "train.max_steps=1"))
    row = json.loads((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss", "mse", "gan_g", "disc_loss", "disc/real_logit", "lr", "images_per_s"} <= set(row)


def test_phase_must_name_a_module(dist_world1, tmp_path):
    from toy_method import ToyImages, ToyMethod

    class Bad(ToyMethod):
        def phases(self):
            return ["generator"]

    exp = cfg_for(tmp_path, "bad")
    job = TrainJob(method=Bad, data=ToyImages().resolve(exp), source=MemoryReaderFactory(n=8), micro_batch_size=2)
    with pytest.raises(ValueError, match=r"phases\(\) = \['generator'\] must name modules"):
        train_loop(exp, WorkerContext(0, 1, torch.device("cpu")), job)


def test_unknown_method_key_is_a_config_error(tmp_path):
    from system.config import ConfigError

    with pytest.raises(ConfigError, match="method.disc_lr"):
        cfg_for(tmp_path, "x", "method.disc_lr=0.1", schema=ToyOneExperiment)


def test_driver_refuses_to_restart_an_existing_run(dist_world1, deterministic_flags, tmp_path):
    import ray

    from cluster.training import run_training

    if ray.is_initialized():
        pytest.skip("needs a process without Ray to see that nothing was allocated")
    run(cfg_for(tmp_path, "done", "train.max_steps=2", "checkpoint.export=false"))
    with pytest.raises(ValueError, match="already has a checkpoint at step 2.*checkpoint.resume=true"):
        exp = cfg_for(tmp_path, "done", "checkpoint.resume=false")
        run_training(exp, resolve_job(exp, source=MemoryReaderFactory(n=8)))
    assert not ray.is_initialized()  # refused before any resource was allocated


def test_finished_run_says_so_and_leaves_the_export_alone(dist_world1, deterministic_flags, tmp_path):
    """Rerunning a finished run (e.g. `make demo ARGS=train.max_steps=50` after the demo) says at once
    that it is past train.max_steps and how to start a new run; nothing is trained or rewritten."""
    import ray

    from cluster.cli import RunFinished
    from cluster.training import prepare_run

    if ray.is_initialized():
        pytest.skip("needs a process without Ray to see that nothing was allocated")
    run(cfg_for(tmp_path, "done", "train.max_steps=2"))
    export = tmp_path / "done" / "export" / "encoder.safetensors"
    before = export.stat().st_mtime_ns
    with pytest.raises(RunFinished, match=r"already at step 2 >= train.max_steps=1.*run_name=done-2"):
        prepare_run(cfg_for(tmp_path, "done", "train.max_steps=1"))
    assert not ray.is_initialized() and export.stat().st_mtime_ns == before


def test_stale_extension_build_lock_is_named(tmp_path):
    import os
    import time

    from cluster.runtime import STALE_LOCK_S, check_extension_locks
    from system.config import ConfigError

    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    check_extension_locks(str(tmp_path))  # fresh: a build may be running
    old = time.time() - STALE_LOCK_S - 10
    os.utime(lock, (old, old))
    with pytest.raises(ConfigError, match=f"rm {lock}"):
        check_extension_locks(str(tmp_path))


def test_metrics_of_a_step_reach_storage_before_its_commit_marker(dist_world1, tmp_path, monkeypatch):
    """A kill between a checkpoint's commit marker and the metrics write lost the rows since the
    previous commit (the fault soak: driver killed at step 3, the resumed run's metrics held steps
    1, 2, 5, 6). metrics.jsonl is written first: at each commit it already holds that step's row."""
    import cluster.loop as L

    seen = {}
    real = L.commit_checkpoint

    def commit(store, strategy, engines, state, **kw):
        seen[state.step] = sorted({int(r["step"]) for r in store.read_jsonl("metrics.jsonl")})
        return real(store, strategy, engines, state, **kw)

    monkeypatch.setattr(L, "commit_checkpoint", commit)
    run(cfg_for(tmp_path, "order"))
    assert seen == {2: [1, 2], 4: [1, 2, 3, 4]}, seen
