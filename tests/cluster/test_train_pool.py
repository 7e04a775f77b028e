"""End to end through Ray Train (2 CPU workers, gloo) + DeepSpeed: ZeRO 1/2/3, export + reload,
crash + resume == uninterrupted (bit for bit), data seen exactly once, resubmission, S3 storage."""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from ar_fixtures import free_port, write_image_shards
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
N_SAMPLES = 16  # 2 ranks x batch 2 -> 4 steps per epoch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster(s3_server, tmp_path_factory):
    import ray

    # (a faster V2 controller for short test runs: tests/conftest.py)
    os.environ.update(RAY_RESULTS_DIR=str(tmp_path_factory.mktemp("ray_results")))
    env = {
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'cluster'}",
        "DS_ACCELERATOR": "cpu",
        "WANDB_MODE": "offline",
        **{k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")},
    }
    if ray.is_initialized():  # another module's cluster lacks our env vars
        ray.shutdown()
    # own dashboard: Ray Train's placement-group cleaner asks it whether the controller lives; without
    # one it asks 127.0.0.1:8265, which may be another Ray on a shared machine (see ar_fixtures.ray_local)
    ray.init(num_cpus=4, include_dashboard=True, dashboard_port=free_port(), runtime_env={"env_vars": env}, log_to_driver=True)
    yield s3_server
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_image_shards(str(tmp_path_factory.mktemp("shards")), N_SAMPLES, quality=90)


def make_cfg(name: str, storage: str, shards: str, *overrides: str):
    from system.config.load import load_config
    from toy_method import ToyExperiment

    return load_config(ToyExperiment, [
        f"run_name={name}", f"data.url={shards}", "data.resolution=16", "data.batch_size=2", "data.num_workers=0",
        "cluster.num_workers=2", "cluster.device=cpu", "cluster.max_failures=0", f"checkpoint.storage_path={storage}",
        "checkpoint.every_steps=2", "checkpoint.keep_last=1", "train.max_steps=4", "method.ema_decay=0.9",
        "train.sample_grid=2", "optim.lr=0.01", "optim.warmup_steps=1", "logging.wandb_mode=disabled",
        "logging.log_every=1", "logging.progress=false", *overrides,
    ])


def train(cfg, key_log=None):
    from cluster.training import run_training
    if key_log:
        cfg = replace(cfg, method=replace(cfg.method, key_log=str(key_log)))
    return run_training(cfg)


def exported(run: Path, suffix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for part in ("encoder", "decoder"):
        out.update({f"{part}.{k}": v for k, v in load_file(run / "export" / f"{part}{suffix}.safetensors").items()})
    return out


def check_export_matches_checkpoint(run: Path, step: int) -> None:
    """Exported safetensors load into a plain module (no DeepSpeed) and equal DeepSpeed's own
    consolidation of the final checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from toy_method import ToyGenerator

    weights = exported(run)
    plain = ToyGenerator()
    plain.load_state_dict(weights)  # strict: every key present
    ref = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints" / f"step_{step:08d}"), tag="gen")
    assert set(ref) == set(weights)
    assert all(torch.equal(ref[k], weights[k]) for k in ref)
    ema = exported(run, "_ema")
    assert set(ema) == set(weights) and any(not torch.equal(ema[k], weights[k]) for k in ema)
    assert (run / "export" / "config.yaml").is_file()


def key_log(path: Path) -> dict[tuple[int, int], list[str]]:
    """(rank, step) -> keys of the last attempt that ran that step."""
    out = {}
    for rank in (0, 1):
        for line in (path / f"keys_rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            out[(rank, row["step"])] = row["keys"]
    return out


@pytest.fixture(scope="module")
def zero3_run(ray_cluster, shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("z3")
    cfg = make_cfg("zero3", str(root), shards, "deepspeed.zero_stage=3", "logging.wandb_mode=offline", "logging.progress=true")
    return train(cfg), root / "zero3"


def test_zero3_end_to_end_export_reload(zero3_run):
    res, run = zero3_run
    assert res.step == 4 and res.checkpoint_url.endswith("step_00000004") and res.metrics["step"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004"]  # keep_last=1
    assert (run / "checkpoints" / "step_00000004" / "COMMITTED").is_file()
    check_export_matches_checkpoint(run, 4)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert {"loss", "mse", "disc_loss", "lr", "images_per_s"} <= set(rows[-1])
    assert Image.open(run / "samples" / "step_00000004.png").size[0] > 16
    assert json.loads((run / "metrics.json").read_text())["step"] == 4
    assert any((run / "wandb").glob("offline-run-*"))  # wandb offline run written by rank 0


def test_zero1_on_s3_agrees_with_zero3_then_resubmit(ray_cluster, shards, tmp_path, zero3_run):
    """ZeRO-1 with the run on S3 trains the same weights (and EMA, kept per partition under ZeRO-3)
    as ZeRO-3 up to float reduction order; a second job with the same run name continues from the
    stored step, ignoring a newer checkpoint folder that has no marker."""
    import s3fs

    endpoint = ray_cluster
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir("runs-bucket")
    over = ["deepspeed.zero_stage=1", f"data.storage.endpoint_url={endpoint}", "data.storage.key=testing", "data.storage.secret=testing"]
    res = train(make_cfg("z1", "s3://runs-bucket/exp", shards, *over))
    run = "runs-bucket/exp/z1"
    assert res.step == 4 and res.checkpoint_url == f"s3://{run}/checkpoints/step_00000004"
    assert fs.exists(f"{run}/checkpoints/step_00000004/COMMITTED") and not fs.exists(f"{run}/checkpoints/step_00000002")
    assert "secret: '***'" in fs.cat(f"{run}/config.yaml").decode()  # credentials redacted
    local = tmp_path / "z1"
    fs.get(f"{run}/", str(local), recursive=True)
    check_export_matches_checkpoint(local, 4)
    for suffix in ("", "_ema"):
        a, b = exported(local, suffix), exported(zero3_run[1], suffix)
        assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a), f"ZeRO-1 vs ZeRO-3 export{suffix}"

    fs.pipe(f"{run}/checkpoints/step_00000005/gen/garbage.pt", b"half written")  # no marker: must be ignored
    res2 = train(make_cfg("z1", "s3://runs-bucket/exp", shards, *over, "train.max_steps=6"))
    assert res2.step == 6
    assert not fs.exists(f"{run}/checkpoints/step_00000005")  # the unmarked leftover was removed
    summary = json.loads(fs.cat(f"{run}/metrics.json"))
    assert summary["start_step"] == 4 and summary["step"] == 6
    steps = [json.loads(x)["step"] for x in fs.cat(f"{run}/metrics.jsonl").decode().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_crash_resume_is_bit_identical(ray_cluster, shards, tmp_path):
    """ZeRO-2: a worker killed at step 3 (after the step-2 checkpoint) -> the pool restarts, resumes
    and ends bit-identical to an uninterrupted run; the data reader saw each sample exactly once."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    plain = make_cfg("plain", str(tmp_path), shards, "deepspeed.zero_stage=2")
    train(plain, key_log=tmp_path / "keys_plain")
    crash = make_cfg("crash", str(tmp_path), shards, "deepspeed.zero_stage=2", "fault.crash_at_step=3",
                     "fault.crash_rank=1", "cluster.max_failures=1")
    res = train(crash, key_log=tmp_path / "keys_crash")
    assert res.step == 4
    assert (tmp_path / "crash" / "fault" / "crash_at_step_00000003.json").is_file()  # the crash did happen
    assert json.loads((tmp_path / "crash" / "metrics.json").read_text())["start_step"] == 2  # resumed at 2
    check_export_matches_checkpoint(tmp_path / "plain", 4)

    for suffix in ("", "_ema"):
        a, b = exported(tmp_path / "plain", suffix), exported(tmp_path / "crash", suffix)
        assert all(torch.equal(a[k], b[k]) for k in a), f"exported{suffix} weights differ"
    for tag in ("gen", "disc"):
        a, b = (get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / r / "checkpoints" / "step_00000004"), tag=tag)
                for r in ("plain", "crash"))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{tag} differs after crash + resume"

    want, got = key_log(tmp_path / "keys_plain"), key_log(tmp_path / "keys_crash")
    assert got == want  # same batches at the same steps on the same ranks
    seen = Counter(k for keys in got.values() for k in keys)
    assert len(seen) == N_SAMPLES and set(seen.values()) == {1}  # one epoch, every sample exactly once
    attempts = [json.loads(x)["step"] for x in (tmp_path / "keys_crash" / "keys_rank1.jsonl").read_text().splitlines()]
    assert attempts == [0, 1, 2, 2, 3]  # step index 2 ran twice: once before the crash, once after resume


def eostok_cfg(tmp_path, data: str, *over: str):
    from system.config import EOSTokExperiment, load_config

    return load_config(EOSTokExperiment, [
        "--config", str(ROOT / "configs/experiments/eostok_tiny.yaml"), f"data.url={data}", "data.val_url=null",
        "data.resolution=32", "data.batch_size=2", f"checkpoint.storage_path={tmp_path / 'runs'}",
        "cluster.max_failures=0", "logging.wandb_mode=disabled", "logging.progress=false", "train.sample_grid=2",
        "method.gan_start_step=0", *over,
    ])


def test_eostok_zero3_partitioned_train_export_reload(ray_cluster, tmp_path):
    """EOSTok itself under ZeRO-3 with every parameter partitioned (the codebook is read outside
    the quantizer's forward: registered as an external parameter), then reloaded without DeepSpeed."""
    from cluster.training import run_training
    from system.data.embedded import ensure_embedded_dataset
    from system.models.artifacts import load_part, read_model_json
    from system.models.tokenizers import load_tokenizer

    data = ensure_embedded_dataset(str(tmp_path / "data" / "train"), per_class=4, num_shards=2, resolution=64)
    cfg = eostok_cfg(tmp_path, data, "deepspeed.zero_stage=3",
                     "deepspeed.extra={zero_optimization: {stage3_param_persistence_threshold: 0}}",
                     "train.max_steps=2", "checkpoint.every_steps=2")
    result = run_training(cfg)
    assert result.step == 2
    configs = read_model_json(result.export_url)
    assert configs["tokenizer"]["kind"] == "tokenizer1d" and configs["ar"]["kind"] == "gpt"
    tok = load_tokenizer(result.export_url, ema=False)
    k, d = configs["tokenizer"]["config"]["quantizer"]["codebook_size"], configs["tokenizer"]["config"]["latent_dim"]
    assert tuple(tok.codebook.shape) == (k, d) and float(tok.codebook.abs().sum()) > 0
    sd = load_part(result.export_url, "ar", ema=False)
    assert all(v.numel() > 0 for v in sd.values()), "a partitioned (empty) tensor was exported"
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert tok.reconstruct(x).shape == x.shape
    assert (Path(result.run_url) / "samples" / "step_00000002.png").exists()


def test_eostok_crash_resume_with_every_term_is_bit_identical(ray_cluster, tmp_path):
    """EOSTok on 2 ranks with every loss term active (GAN from step 0 with LeCam, EMA, implicit
    alignment + REPA to a random teacher, LPIPS + APR-LPIPS with a random VGG, NTP, APR): rank 1
    killed at step 3 after the step-2 checkpoint -> the resumed run exports exactly the weights of
    an uninterrupted run. (Found from outside: LeCam's per-rank EMA buffers came back as rank 0's
    on every rank, because DeepSpeed saves buffers from rank 0 only; the loop now keeps them per rank.)"""
    from cluster.training import run_training
    from system.data.embedded import ensure_embedded_dataset
    from system.models.artifacts import load_part

    data = ensure_embedded_dataset(str(tmp_path / "data" / "train"), per_class=4, num_shards=2, resolution=64)
    terms = ["method.lpips=0.5", "method.apr_lpips=0.5", "method.lecam=0.05", "method.gan=0.1", "method.align=0.5",
             "method.repa=0.5", "method.ntp=0.1", "method.ema_decay=0.9", "deepspeed.zero_stage=2", "train.max_steps=4",
             "checkpoint.every_steps=2", "checkpoint.keep_last=2", "train.sample_grid=0"]
    run_training(eostok_cfg(tmp_path, data, "run_name=plain", *terms))
    crash = eostok_cfg(tmp_path, data, "run_name=crash", *terms, "fault.crash_at_step=3", "fault.crash_rank=1",
                       "cluster.max_failures=1")
    assert run_training(crash).step == 4
    runs = tmp_path / "runs"
    assert (runs / "crash" / "fault" / "crash_at_step_00000003.json").is_file()
    assert json.loads((runs / "crash" / "metrics.json").read_text())["start_step"] == 2
    rows = [json.loads(x) for x in (runs / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/lpips", "loss/apr_lpips", "loss/gan_g", "loss/align", "loss/repa", "loss/ntp", "disc/gan/lecam"} <= set(rows[-1])
    for part in ("tokenizer", "ar", "tokenizer_ema", "ar_ema"):
        a = load_part(str(runs / "plain" / "export"), part, ema=False)
        b = load_part(str(runs / "crash" / "export"), part, ema=False)
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert diff == 0.0, f"{part}: crash + resume differs from the uninterrupted run by up to {diff:.3g}"


def test_a_config_error_on_the_ranks_stops_the_run_without_restarts(ray_cluster, shards, tmp_path):
    """An error every restart would meet again (here a ConfigError of the batch source on every rank)
    ends the run at once as a ConfigError with its one-line message: Ray Train does not restart the
    pool for it, although cluster.max_failures allows restarts."""
    import time

    from cluster.training import resolve_job, run_training
    from system.config import ConfigError
    from toy_method import RefusingFactory

    cfg = make_cfg("refused", str(tmp_path / "runs"), shards, "cluster.max_failures=3")
    job = resolve_job(cfg, source=RefusingFactory(str(tmp_path / "calls")))
    t = time.monotonic()
    with pytest.raises(ConfigError, match=r"^config key 'data.url': refused on rank [01]$"):
        run_training(cfg, job)
    assert time.monotonic() - t < 120
    assert sorted((tmp_path / "calls" / "calls").read_text().split()) == ["0", "1"]  # one attempt: no restart
    assert "config error: config key 'data.url': refused on rank 1" in (tmp_path / "runs" / "refused" / "logs" / "rank_1.log").read_text()
