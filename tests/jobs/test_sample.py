import json
import shutil

import numpy as np
import pytest
import torch

import sample  # jobs/sample.py (tests/jobs/conftest.py puts jobs/ on sys.path)
from system.config.eval_schema import SampleConfig
from system.eval.sample_parts import PartSampler
from system.eval.sampling_plan import SamplingPlan


@pytest.mark.parametrize(
    "argv,message",
    [
        (["export_url=/x", "num_per_clas=3"], "unknown config key 'num_per_clas'"),
        (["export_url=/x", "cfg_schedule=cosine"], "cfg_schedule"),
        (["export_url=/x", "batch_size=0"], "batch_size"),
        (["export_url=/x", "top_p=0"], "top_p"),
        ([], "export_url"),
    ],
)
def test_config_errors_exit_2_before_ray(argv, message, capsys):
    import ray

    was_up = ray.is_initialized()
    with pytest.raises(SystemExit) as exit_info:
        sample.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:") and message in err
    assert was_up or not ray.is_initialized()


def test_part_depends_on_seed_not_on_what_ran_before(tiny_export, tmp_path):
    cfg = SampleConfig(export_url=str(tiny_export), out=str(tmp_path), batch_size=4)
    sampler = PartSampler(cfg)
    plan0, plan1 = SamplingPlan(4, 2, 4, seed=0), SamplingPlan(4, 2, 4, seed=1)
    a, codes_a = sampler.sample(plan0.part(1))
    sampler.sample(plan0.part(0))
    b, _ = sampler.sample(plan0.part(1))
    _, codes_c = sampler.sample(plan1.part(1))
    assert a.dtype == np.uint8 and a.shape == (4, 32, 32, 3) and codes_a.shape == (4, 16)
    assert np.array_equal(a, b)
    assert not np.array_equal(codes_a, codes_c)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from cluster.runtime import init_ray
    from system.config import ClusterConfig

    started = not ray.is_initialized()
    init_ray(ClusterConfig(local_num_cpus=2))
    yield
    if started:
        ray.shutdown()


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.slow
def test_sample_job_deterministic_resumable_and_survives_a_killed_actor(ray_local, tiny_export, tmp_path, capsys):
    common = [f"export_url={tiny_export}", "num_per_class=4", "num_classes=2", "batch_size=2", "grid_classes=2", "seed=5"]
    a = tmp_path / "a"
    assert sample.main(common + [f"out={a}", "num_actors=2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["parts_made"] == 4 and summary["parts_skipped"] == 0 and summary["num_actors"] == 2
    ref = _load(a / "samples.npz")
    assert ref["arr_0"].shape == (8, 32, 32, 3) and ref["arr_0"].dtype == np.uint8
    assert ref["labels"].tolist() == [0, 1] * 4 and ref["codes"].shape == (8, 16)
    assert ref["arr_0"].std() > 0 and (a / "grids/grid_00.png").stat().st_size > 0
    assert len({ref["codes"][i].tobytes() for i in range(8)}) == 8  # parts differ from each other

    # Another run: a copy of the first with 3 of 4 parts lost, one actor, which dies making part 2.
    b = tmp_path / "b"
    shutil.copytree(a / "parts", b / "parts")
    for i in (1, 2, 3):
        (b / f"parts/part_{i:05d}.npz").unlink()
    assert sample.main(common + [f"out={b}", "num_actors=1", "crash_at_part=2", "progress=false"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["parts_skipped"] == 1 and summary["parts_made"] == 3 and summary["failures"] == 1
    got = _load(b / "samples.npz")
    for key in ("arr_0", "labels", "codes"):
        assert np.array_equal(got[key], ref[key]), key

    # A finished run re-run makes nothing; other settings on the same out are refused.
    assert sample.main(common + [f"out={a}", "num_actors=1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["parts_made"] == 0
    with pytest.raises(ValueError, match="seed: 5 -> 6"):
        sample.main([*common[:-1], "seed=6", f"out={a}"])
    assert torch.equal(torch.from_numpy(_load(a / "samples.npz")["arr_0"]), torch.from_numpy(ref["arr_0"]))


@pytest.mark.slow
def test_evaluate_runs_as_a_ray_task_when_ray_is_up(ray_local, tiny_export, tmp_path, monkeypatch):
    import evaluate  # jobs/evaluate.py

    monkeypatch.chdir(tmp_path)  # relative paths are resolved on the driver, then sent to the worker
    rng = np.random.default_rng(0)
    np.savez("s.npz", arr_0=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), labels=np.arange(6) % 2)
    argv = ["samples=s.npz", "out=ev", "max_images=4", "batch_size=8", "pr_k=2", "logging.wandb_mode=disabled"]
    assert evaluate.main(argv) == 0
    report = json.loads((tmp_path / "ev/report.json").read_text())
    assert report["generation"]["num_images"] == 6 and report["generation"]["reference_images"] == 4
    assert report["config"]["samples"] == str(tmp_path / "s.npz") and report["reconstruction"] is None
    assert np.isfinite(report["generation"]["fid"])
