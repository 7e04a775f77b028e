"""VAπ end to end on CPU: 2 rollout actors + a Ray Train + DeepSpeed learner pool on the embedded photos.

One run checks that the held-out teacher-forced reward rises while a rollout actor is killed
mid-iteration (its groups re-issued, none lost or duplicated); a second run kills the learner and
resumes it from its checkpoint (data position and trained groups included)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from ar_fixtures import free_port
import torch

ROOT = Path(__file__).resolve().parents[2]


def _make_export(folder: Path) -> Path:
    spec = importlib.util.spec_from_file_location("jobs_conftest", ROOT / "tests/jobs/conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_export(folder)


def _pretrain_tokenizer(export: Path, data_url: str, steps: int = 30) -> None:
    """A few reconstruction steps, so that decoded pixels depend on the codes (a random decoder
    ignores them and every reward in a group would be the same)."""
    from safetensors.torch import save_file

    from system.data.stream import ShardReader
    from system.models.artifacts import load_part, model_part
    from system.models.tokenizer1d import build_tokenizer1d

    torch.manual_seed(0)
    tok = build_tokenizer1d(model_part(str(export), "tokenizer")["config"], load_part(str(export), "tokenizer"))
    tok.train()
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    it = iter(ShardReader(data_url, rank=0, world_size=1, batch_size=8, resolution=32, num_workers=0, seed=0))
    for _ in range(steps):
        x = next(it)["image"]
        out = tok(x)
        loss = (out.image - x).pow(2).mean() + sum(out.quant.losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_file({k: v.contiguous() for k, v in tok.state_dict().items()}, str(export / "tokenizer.safetensors"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import ray

    from system.data.embedded import ensure_embedded_dataset

    root = tmp_path_factory.mktemp("vapi")
    train = ensure_embedded_dataset(str(root / "data/train"), split="train")
    val = ensure_embedded_dataset(str(root / "data/val"), split="val")
    export = _make_export(root / "export")
    _pretrain_tokenizer(export, train)
    if ray.is_initialized():
        ray.shutdown()
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "DS_ACCELERATOR": "cpu"}
    # own dashboard: Ray Train's placement-group cleaner asks it whether the controller lives; without
    # one it asks 127.0.0.1:8265, which may be another Ray on a shared machine (see ar_fixtures.ray_local)
    ray.init(num_cpus=4, include_dashboard=True, dashboard_port=free_port(), runtime_env={"env_vars": env}, log_to_driver=True)
    yield root, train, val, export
    ray.shutdown()


def _cfg(setup, run: str, *extra: str):
    from system.config import VapiExperiment, load_config

    root, train, val, export = setup
    argv = [f"run_name={run}", f"data.url={train}", f"data.val_url={val}", f"method.export_url={export}",
            f"checkpoint.storage_path={root}/runs", "logging.wandb_mode=disabled", "logging.progress=false",
            "data.resolution=32", *extra]  # the tiny export is a 32 px tokenizer
    return load_config(VapiExperiment, argv, ["experiments/vapi_tiny.yaml"])


def run_vapi(exp, source=None) -> dict:
    """A VAπ run through the generic driver (`cluster.training.run_training`), summed up as the tests
    read it: its metrics (probe, re-issues, learner restarts), trained group ids and history."""
    import json

    from cluster.checkpoint import CheckpointStore
    from cluster.training import resolve_job, run_training

    res = run_training(exp, resolve_job(exp, source=source))
    store = CheckpointStore(res.run_url)
    fed = json.loads(store.read_bytes("metrics.json") or b"{}").get("source", {})
    return {**res.metrics, "step": res.step, "groups": fed.get("groups", []), "run_url": res.run_url,
            "history": store.read_jsonl("metrics.jsonl")}


def test_object_store_publisher_round_trips_any_state_dict(setup):
    """One flat buffer through the object store: every dtype, shape and empty tensor comes back equal,
    and loading it into a model gives the published weights."""
    from cluster.rollout_pool import ObjectStorePublisher
    from system.models.gpt import GPT
    from system.models.registry import gpt_config

    sd = {"w": torch.randn(3, 5), "h": torch.randn(7).to(torch.bfloat16), "i": torch.arange(4), "e": torch.empty(0, 2),
          "b": torch.tensor([True, False]), "t": torch.randn(4, 6).t()}  # the last one is not contiguous
    pub = ObjectStorePublisher()
    for version in range(2):  # the staging buffer is reused
        out = pub.fetch(pub.publish(sd, version))
        assert list(out) == list(sd)
        for k in sd:
            assert out[k].dtype == sd[k].dtype and torch.equal(out[k], sd[k]), k
    src, dst = GPT(gpt_config("debug-tiny")), GPT(gpt_config("debug-tiny"))
    dst.load_state_dict(pub.fetch(pub.publish(src.state_dict(), 2)))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_reward_rises_and_rollout_actor_loss_loses_no_group(setup):
    cfg = _cfg(setup, "rise", "train.max_steps=10", "optim.lr=3e-3", "optim.min_lr=3e-3", "checkpoint.every_steps=10",
               "method.crash_rollout_at_call=4")
    out = run_vapi(cfg)
    print(f"held-out teacher-forced reward: {out['heldout_start']:.5f} -> {out['heldout_end']:.5f}")
    assert out["heldout_end"] > out["heldout_start"]
    assert out["rollout_reissued"] >= 1  # an actor died mid-iteration and its chunk was re-issued
    assert sorted(out["groups"]) == list(range(10 * cfg.data.batch_size))  # none lost, none twice
    h = out["history"]
    assert all(r["staleness"] == 0 for r in h) and all(r["weight_sync_s"] >= 0 for r in h)
    assert h[-1]["ce_prior"] < h[0]["ce_prior"]

    # the same run_name again: refused without checkpoint.resume, continued with it
    with pytest.raises(ValueError, match="already has a checkpoint at step 10"):
        run_vapi(_cfg(setup, "rise", "train.max_steps=12", "checkpoint.resume=false"))
    more = run_vapi(_cfg(setup, "rise", "train.max_steps=12", "checkpoint.every_steps=10", "method.heldout_images=0"))
    assert more["step"] == 12 and sorted(more["groups"]) == list(range(12 * cfg.data.batch_size))
    assert [r["step"] for r in more["history"]] == list(range(1, 13))  # history kept, steps 11-12 appended


@pytest.mark.parametrize("off_policy", [False, True])
def test_learner_crash_resumes_from_checkpoint(setup, off_policy):
    """The learner dies after the update of step 3 (checkpoint at 2): the pool restarts, resumes from
    step 2 (weights, optimizer, reader position, trained groups) and finishes. On-policy the result
    is the uninterrupted run's, step for step; off-policy the staleness is one version."""
    from cluster.checkpoint import CheckpointStore
    common = ("train.max_steps=4", "checkpoint.every_steps=2", f"method.off_policy={str(off_policy).lower()}",
              "method.heldout_images=0", "optim.lr=3e-3", "optim.min_lr=3e-3")
    cfg = _cfg(setup, f"resume-{off_policy}", *common, "fault.crash_at_step=3")
    out = run_vapi(cfg)
    assert out["learner_restarts"] == 1 and out["step"] == 4
    assert sorted(out["groups"]) == list(range(4 * cfg.data.batch_size))  # steps 1-2 from the checkpoint, 3-4 redone
    store = CheckpointStore(out["run_url"])
    assert store.latest_complete().step == 4 and store.exists("fault/crash_at_step_00000003.json")
    if off_policy:
        assert max(r["staleness"] for r in out["history"]) == 1
        return
    ref = run_vapi(_cfg(setup, "no-crash", *common))
    assert ref["learner_restarts"] == 0
    for a, b in zip(ref["history"], out["history"], strict=True):
        for k in ("reward_mean", "ce_prior", "pg_loss", "loss"):
            assert a[k] == b[k], (a["step"], k)


def test_two_rank_zero3_learner_matches_one_rank(setup):
    """The batch is scattered over 2 learner ranks (whole groups each) under ZeRO-3 and the weights
    are gathered to publish: the run follows the 1-rank ZeRO-0 run (same rollouts, same updates)."""
    common = ("train.max_steps=3", "optim.lr=3e-3", "optim.min_lr=3e-3", "checkpoint.every_steps=3",
              "method.heldout_images=0", "cluster.local_num_cpus=4",
              "method.update_mode=eval")  # train mode draws dropout masks per rank: 1 and 2 ranks differ
    one = run_vapi(_cfg(setup, "one-rank", *common))
    two = run_vapi(_cfg(setup, "two-ranks", *common, "cluster.num_workers=2", "deepspeed.zero_stage=3"))
    assert sorted(two["groups"]) == list(range(3 * 4))
    for a, b in zip(one["history"], two["history"], strict=True):
        print(f"step {a['step']}: reward {a['reward_mean']:.6f} vs {b['reward_mean']:.6f}, "
              f"ce {a['ce_prior']:.6f} vs {b['ce_prior']:.6f}")
        for k in ("reward_mean", "ce_prior", "pg_loss", "clip_frac"):
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-5), k


@pytest.fixture(scope="module")
def llamagen_ckpts(setup):
    """A tiny GPT and VQ saved in LlamaGen's checkpoint layouts (32 px, 8x downsampling: 4x4 codes)."""
    from system.models.adapters_llamagen_gpt import to_llamagen_gpt
    from system.models.adapters_vq import to_llamagen_state_dict
    from system.models.gpt import GPT
    from system.models.registry import gpt_config
    from system.models.vqgan import VQGANConfig, VQModel

    root = setup[0]
    torch.manual_seed(0)
    vq = VQModel(VQGANConfig(codebook_size=64, codebook_dim=8, ch=32, ch_mult=(1, 2, 2, 2), z_channels=32, num_res_blocks=1))
    gpt = GPT(gpt_config("debug-tiny", vocab_size=64, block_size=16))
    torch.save({"model": to_llamagen_gpt(gpt.state_dict()), "steps": 1}, root / "c2i_tiny.pt")
    torch.save({"model": to_llamagen_state_dict(vq)}, root / "vq_tiny.pt")
    return ("method.export_url=null", f"method.llamagen_gpt={root / 'c2i_tiny.pt'}",
            f"method.llamagen_vq={root / 'vq_tiny.pt'}", "method.llamagen_preset=debug-tiny")


def test_llamagen_checkpoints_through_the_pool(setup, llamagen_ckpts):
    out = run_vapi(_cfg(setup, "llamagen", *llamagen_ckpts, "train.max_steps=3", "checkpoint.every_steps=3",
                        "method.heldout_images=4"))
    assert out["step"] == 3 and sorted(out["groups"]) == list(range(3 * 4))
    assert all(r["reward_std"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in out["history"])
    assert out["heldout_start"] < 0 and out["heldout_end"] < 0


def test_model_that_does_not_fit_fails_before_training(setup, llamagen_ckpts):
    """An AR length that differs from the tokenizer's code count is reported by the rollout actors'
    constructors, before the learner pool starts."""
    with pytest.raises(Exception, match="gives 16 codes per 32 px image but the AR model generates 64"):
        run_vapi(_cfg(setup, "misfit", *llamagen_ckpts, "method.gpt_overrides.block_size=64", "train.max_steps=2"))


def _parts_failing_at_rollout(cfg):
    """The default parts, with a tokenizer whose encode fails (a bug inside a rollout)."""
    from system.methods.vapi_rollouts import default_parts

    policy, tok, lp = default_parts(cfg)

    def broken(images):
        raise FloatingPointError("injected rollout failure")

    tok.encode = broken
    return policy, tok, lp


def test_error_inside_a_rollout_ends_the_run_with_that_error(setup):
    """A Python error in a rollout task reaches the driver (through the learner pool), no hang."""
    import sys

    import ray.cloudpickle

    from system.methods.vapi_rollouts import VapiRollouts

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors import no test module
    cfg = _cfg(setup, "broken", "train.max_steps=2", "cluster.max_failures=0", "method.heldout_images=0")
    with pytest.raises(Exception, match="injected rollout failure"):
        run_vapi(cfg, source=VapiRollouts(parts_fn=_parts_failing_at_rollout))


def test_job_entry_point_runs_and_prints_the_reward(setup, capsys):
    """jobs/vapi.py end to end (Ray is already up here, so the job joins it)."""
    import importlib.util
    import json

    root, train, val, export = setup
    spec = importlib.util.spec_from_file_location("vapi_job", ROOT / "jobs/vapi.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--config", str(ROOT / "configs/experiments/vapi_tiny.yaml"), "run_name=job", f"data.url={train}",
                     f"data.val_url={val}", f"method.export_url={export}", "data.resolution=32", "train.max_steps=2",
                     f"checkpoint.storage_path={root}/runs", "logging.wandb_mode=disabled", "logging.progress=false",
                     "method.heldout_images=4"]) == 0
    out = capsys.readouterr().out
    assert "held-out teacher-forced reward:" in out
    summary = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert summary["step"] == 2 and summary["groups"] == 8 and summary["learner_restarts"] == 0
    assert (root / "runs/job/config.yaml").exists()
    # the post-trained policy is exported like any artifact (with its tokenizer): sampling loads it
    from system.sampling.generators import load_pair

    tok, gen = load_pair(str(root / "runs/job/export"))
    assert tok.decode(gen.sample(torch.tensor([0, 1]), seed=0)).shape == (2, 3, 32, 32)


def test_resolution_mismatch_is_a_config_error(setup, capsys):
    import importlib.util

    root, train, val, export = setup
    spec = importlib.util.spec_from_file_location("vapi_job", ROOT / "jobs/vapi.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    with pytest.raises(SystemExit) as e:
        job.main(["--config", str(ROOT / "configs/experiments/vapi_tiny.yaml"), f"method.export_url={export}",
                  f"data.url={train}", "data.resolution=64"])
    assert e.value.code == 2
    assert "set data.resolution=32" in capsys.readouterr().err
