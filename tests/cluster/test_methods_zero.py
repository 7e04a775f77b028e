"""Every registered method under DeepSpeed ZeRO 1, 2 and 3 on 2 ranks (spawned processes, gloo, no
Ray): one step with its validation set on (the untrained baseline and the end), a checkpoint, a
resume for a second step (validated again), a checkpoint and the export. ZeRO-3 partitions every
parameter (no persistence threshold), so a weight read outside a module's own forward is caught.

Cheap by construction: one pair of processes per method runs all three stages (the method's
modules at the tiny presets made smaller still, batches of 2, 32 px); an actor-fed source gets its
worker in rank 0's process instead of an actor pool (`LocalPool`: the pool's submit / gather, the
same `FedSource` of cluster/rollout_pool.py)."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from multirank import run_ranks

STAGES = (1, 2, 3)
RES = 32
COMMON = ["data.batch_size=2", "data.num_workers=0", "cluster.num_workers=2", "cluster.device=cpu",
          "optim.warmup_steps=0", "optim.grad_accum=1", "checkpoint.every_steps=1", "checkpoint.keep_last=2",
          "logging.wandb_mode=disabled", "logging.progress=false", "logging.log_every=1", "train.sample_grid=2",
          "train.val_max_images=4", "train.val_every=0"]
ZERO3_ALL = "deepspeed.extra={zero_optimization: {stage3_param_persistence_threshold: 0}}"
SEMTOK_SMALL = ("{num_tokens: 8, encoder: {depth: 1, width: 32, heads: 2}, decoder: {depth: 1, heads: 2, head_dim: 16, "
                "dual_attention_layers: [], pos_embed_max_size: 8, sample_size: 4}, sample_steps: 2}")
ALITOK_TOKENIZER = ("method.tokenizer_overrides={num_latent_tokens: 16, num_prefix_tokens: 5, token_mix: true}")


@dataclass(frozen=True)
class Case:
    """How one registered method is configured here: its schema, default files and overrides
    ({images}, {val}, {tokens}, {val_tokens}, {export} filled from the fixture's files), and whether
    it validates (a method with no `validate` has nothing to log)."""

    schema: str
    defaults: tuple[str, ...]
    over: tuple[str, ...]
    validates: bool = True
    fed: bool = False  # its batches come from an actor-fed source
    needs: tuple[str, ...] = field(default=())  # exports of other cases it reads (made from random weights)


IMAGES = ("data.url={images}", "data.val_url={val}", f"data.resolution={RES}", "data.embedded=false")
TOKENS = ("data.url={tokens}", "data.val_url={val_tokens}")
CASES = {
    "eostok": Case("EOSTokExperiment", ("experiments/eostok_tiny.yaml",), (*IMAGES, "method.gan=0.1", "method.gan_start_step=0",
                   "method.model.tokenizer_overrides={num_latent_tokens: 16, enc_width: 32, dec_width: 32, enc_heads: 2, "
                   "dec_heads: 2, quantizer: {type: ibq, codebook_size: 64, dim: 16}}")),
    "alitok_stage1": Case("AliTokStage1Experiment", ("experiments/alitok_tiny_stage1.yaml",),
                          (*IMAGES, ALITOK_TOKENIZER, "method.gan_start_step=0")),
    "alitok_stage2": Case("AliTokStage2Experiment", ("experiments/alitok_tiny_stage2.yaml",),
                          (*IMAGES, "method.stage1_export={export_alitok_stage1}", "method.gan_start_step=0"),
                          needs=("alitok_stage1",)),
    "latent_vae": Case("LatentVAEExperiment", ("experiments/semtok_vae.yaml",), (*IMAGES, "method.tiny=true")),
    "semtok_stage1": Case("SemTokStage1Experiment", ("experiments/semtok_stage1.yaml",),
                          (*IMAGES, "method.tokenizer=semtok-tiny", f"method.tokenizer_overrides={SEMTOK_SMALL}",
                           "method.vae={random_init: true, tiny: true}", "method.proj_hidden=32", "method.sample_steps=2",
                           f"method.teacher={{kind: siglip, random_init: true, tiny: true, image_size: {RES}, hub_name: null}}",
                           "method.ema_decay=0.9")),
    "semtok_stage2": Case("SemTokStage2Experiment", ("experiments/semtok_stage2.yaml",),
                          (*IMAGES, "method.stage1_export={export_semtok_stage1}", "method.lpips=0", "method.resnet=0",
                           "method.gan=0.1", "method.gan_start_step=0", "method.ema_decay=0.9"), needs=("semtok_stage1",)),
    "ar": Case("ARExperiment", ("experiments/ar_tiny.yaml",),
               (*TOKENS, "method.model=debug-tiny", "method.overrides={n_layer: 1, dim: 32, n_head: 2}",
                "method.tokenizer_export=null", "method.ema_decay=0.9"), validates=False),
    "masked_ar": Case("MaskedARExperiment", ("experiments/ar_semtok.yaml",),
                      (*TOKENS, "method.model=semtok-ar-l", "method.ema_decay=0.9",
                       "method.overrides={n_layer: 1, dim: 32, n_head: 4, mlp_multiple_of: 32}"), validates=False),
    "vapi": Case("VapiExperiment", ("experiments/vapi_tiny.yaml",),
                 (*IMAGES, "method.export_url={export_vapi}", "method.group_size=2", "method.num_rollout_workers=1",
                  "method.heldout_images=2"), validates=False, fed=True),
}


def test_the_matrix_covers_every_registered_method():
    from system.methods import registry

    shipped = [n for n in registry.names() if registry.get(n).method.__module__.startswith("system.")]
    assert sorted(CASES) == sorted(shipped)  # test modules register toy methods of their own


def _config(name: str, files: dict, storage: str, stage: int, steps: int):
    import system.config as C
    from system.config.load import load_config

    case = CASES[name]
    over = list(case.over)
    for key, value in files.items():  # not str.format: the overrides hold YAML braces
        over = [o.replace(f"{{{key}}}", str(value)) for o in over]
    return load_config(getattr(C, case.schema), [
        *over, *COMMON, f"run_name={name}-zero{stage}", f"checkpoint.storage_path={storage}", f"deepspeed.zero_stage={stage}",
        *([ZERO3_ALL] if stage == 3 else []), f"train.max_steps={steps}"], case.defaults)


class LocalPool:
    """`ActorPool`'s submit / gather / stats with the workers in this process (one worker, items run
    at gather, in order)."""

    def __init__(self, factory):
        from cluster.actor_pool import PoolStats

        self.worker, self.stats = factory(), PoolStats()

    def submit(self, items, method="run"):
        return [(method, args) for args in items]

    def gather(self, pending):
        return [getattr(self.worker, method)(*args) for method, args in pending]


class LocalPublisher:
    """Weights handed over as they are (no object store)."""

    def publish(self, state_dict, version):
        return {k: v.detach().clone() for k, v in state_dict.items()}

    def fetch(self, handle):
        return handle


@dataclass
class LocalBinding:
    """An actor-fed source bound to a `LocalPool` on rank 0 (the pool is built where it is used)."""

    source: object

    def check(self, exp):
        self.source.check(exp)

    def resolve(self, exp):
        return self.source.resolve(exp)

    def __call__(self, exp, ctx):
        import functools

        from cluster.rollout_pool import FedSource, WeightFollower

        publisher = LocalPublisher()
        pool = LocalPool(functools.partial(WeightFollower, self.source.worker(exp, None), publisher)) if ctx.rank == 0 else None
        return FedSource(self.source, exp, ctx, pool, publisher)

    def validation(self, exp, ctx):
        return self.source.validation(exp, ctx)


def _train(rank: int, world: int, name: str, files: dict, storage: str) -> dict:
    from cluster.job import TrainJob, WorkerContext
    from cluster.loop import train_loop
    from cluster.training import resolve_job

    out = {}
    for stage in STAGES:
        for steps in (1, 2):  # a fresh run, then its resume
            exp = _config(name, files, storage, stage, steps)
            job = resolve_job(exp)
            if CASES[name].fed:
                job = TrainJob(job.method, job.data, LocalBinding(job.source), exp.data.batch_size // world, "local")
            out[(stage, steps)] = train_loop(exp, WorkerContext(rank, world, torch.device("cpu")), job)["step"]
    return out


def _exports(name: str, files: dict, root: Path) -> None:
    """The exports case `name` reads, from its needs' methods at random weights (their own configs)."""
    from cluster.training import resolve_job
    from system.models.artifacts import save_export

    for need in CASES[name].needs:
        exp = _config(need, files, str(root / "unused"), 1, 1)
        job = resolve_job(exp)
        torch.manual_seed(0)
        method = job.method(exp.method, job.data)
        files[f"export_{need}"] = save_export(str(root / f"export_{need}"), method.artifacts(
            {n: s.module for n, s in method.modules().items()}))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    from ar_fixtures import write_image_shards, write_tokens

    root = tmp_path_factory.mktemp("matrix")
    files = {"images": write_image_shards(str(root / "images"), 8, side=RES),
             "val": write_image_shards(str(root / "val"), 4, side=RES),
             "tokens": write_tokens(str(root / "tokens"), n=8), "val_tokens": write_tokens(str(root / "val_tokens"), n=4, seed=1)}
    spec = importlib.util.spec_from_file_location("jobs_conftest", Path(__file__).parents[1] / "jobs/conftest.py")
    jobs_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jobs_conftest)
    files["export_vapi"] = str(jobs_conftest.make_export(root / "export_vapi"))  # a tokenizer + AR at random weights
    return files


@pytest.mark.parametrize("name", sorted(CASES))
def test_method_trains_validates_resumes_and_exports_under_every_zero_stage(name, data, tmp_path, monkeypatch):
    from system.models.artifacts import load_part

    monkeypatch.setenv("CKPT_STAGE_DIR", str(tmp_path / "stage"))
    files = dict(data)
    _exports(name, files, tmp_path)
    (tmp_path / "runs").mkdir()
    out = run_ranks(_train, 2, name, files, str(tmp_path / "runs"))
    assert all(o == {(s, n): n for s in STAGES for n in (1, 2)} for o in out), out
    for stage in STAGES:
        run = tmp_path / "runs" / f"{name}-zero{stage}"
        where = f"{name} under ZeRO-{stage}"
        sessions = [json.loads(x) for x in (run / "sessions.jsonl").read_text().splitlines()]
        assert [(s["start_step"], s["world_size"]) for s in sessions] == [(0, 2), (1, 2)], where  # resumed at step 1
        assert all((run / "checkpoints" / f"step_{s:08d}" / "COMMITTED").is_file() for s in (1, 2)), where
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [1, 2], where  # every step once
        if CASES[name].validates:
            val = {r["step"]: r for r in rows if any(k.startswith("val/") for k in r)}
            assert sorted(val) == [1, 2] and all(v == v for r in val.values() for v in r.values()), where  # finite
            assert any(k.startswith("val_start/") for r in rows for k in r), where  # the untrained baseline
        model = json.loads((run / "export" / "model.json").read_text())
        for part in model:
            sd = load_part(str(run / "export"), part, ema=False)
            assert sd and all(v.numel() > 0 and bool(torch.isfinite(v.float()).all()) for v in sd.values()), \
                f"{where}: export part {part} holds an empty (partitioned) or non-finite tensor"
