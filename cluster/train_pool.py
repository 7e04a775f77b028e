"""The Ray Train pool: `run_pool(cfg, use_gpu, worker_fn, kwargs)` runs a worker loop (EOSTok's
`cluster.worker_loop.train_worker` via `run_training`, the VAπ learner via `cluster.vapi_run`) on
`cfg.cluster.num_workers` workers (GPU/NCCL or CPU/gloo) under a `TorchTrainer` whose
`FailureConfig(max_failures)` restarts the pool after a lost worker; every (re)start resumes from
the newest complete checkpoint in our store, so resubmitting the same `run_name` continues too.

Ray Train V2 keeps metrics only when reported with a checkpoint, and `report` is a barrier: the
workers report once per commit, rank 0 with a tiny Ray checkpoint that points at ours.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cluster.runtime import check_resources, init_ray, resolve_use_gpu
from system.config.load import to_yaml
from system.data.storage import protocol

POINTER_FILE = "checkpoint_pointer.json"


@dataclass
class RunResult:
    run_url: str
    step: int
    metrics: dict[str, Any]
    checkpoint_url: Optional[str]
    export_url: Optional[str]
    ray_result: Any = None

    def summary(self) -> dict[str, Any]:
        """JSON-friendly view (without the Ray result object)."""
        return {k: v for k, v in self.__dict__.items() if k != "ray_result"}


def resolve_paths(cfg):
    """A copy of `cfg` whose local storage path is absolute (workers may run in another folder)."""
    sp = cfg.checkpoint.storage_path
    if protocol(sp) == "file" and not sp.startswith("file://"):
        cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, storage_path=os.path.abspath(os.path.expanduser(sp))))
    return cfg


def _ray_report(rank: int) -> Callable[[dict, Optional[str]], None]:
    def report(metrics: dict, url: Optional[str]) -> None:
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if rank == 0 and url is not None:
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, POINTER_FILE), "w") as f:
                    json.dump({"url": url, "step": metrics.get("step")}, f)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)

    return report


def _train_fn(config: dict) -> None:
    """Ray Train worker entry: environment first (DeepSpeed reads DS_ACCELERATOR at import), then
    `worker_fn(cfg, WorkerContext, **worker_kwargs)`."""
    import torch

    use_gpu = config["use_gpu"]
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    from ray.train.torch import get_device

    from cluster.worker_loop import WorkerContext

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device() if use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    wctx = WorkerContext(rank=rank, world_size=world, device=device, report=_ray_report(rank))
    config["worker_fn"](config["cfg"], wctx, **config["worker_kwargs"])


def ray_storage_path(cfg) -> str:
    """Where Ray Train keeps its own run state: beside the run for local storage, else ~/ray_results."""
    sp = cfg.checkpoint.storage_path
    if protocol(sp) == "file":
        return os.path.join(sp.removeprefix("file://"), cfg.run_name, "ray_train")
    return os.path.abspath(os.path.expanduser(os.environ.get("RAY_RESULTS_DIR", "~/ray_results")))


def prepare_run(cfg, extra_cpus: float = 0.0, extra_gpus: float = 0.0):
    """Before any actor starts: absolute local paths, refuse to overwrite a checkpointed run unless
    `checkpoint.resume`, start/join Ray, check the pool (plus `extra_*` resources of other actors)
    fits, save the resolved config. Returns (cfg, store, use_gpu)."""
    from cluster.checkpoint import CheckpointStore
    from cluster.worker_loop import checkpoint_storage, run_url

    cfg = resolve_paths(cfg)
    c = cfg.cluster
    store = CheckpointStore(run_url(cfg), checkpoint_storage(cfg))
    existing = store.latest_complete()  # before any resource is allocated
    if existing is not None and not cfg.checkpoint.resume:
        raise ValueError(
            f"run {cfg.run_name!r} already has a checkpoint at step {existing.step} ({existing.url}); "
            "set checkpoint.resume=true to continue it, or choose another run_name"
        )
    started_here = not ray.is_initialized() and not (c.address or os.environ.get("RAY_ADDRESS"))
    init_ray(c)
    use_gpu = resolve_use_gpu(c)
    if started_here:
        check_resources(c, use_gpu, extra_cpus=extra_cpus, extra_gpus=extra_gpus)
    store.write_bytes("config.yaml", to_yaml(cfg).encode())
    return cfg, store, use_gpu


def run_pool(cfg, use_gpu: bool, worker_fn: Callable[..., Any], worker_kwargs: dict) -> Any:
    """`worker_fn(cfg, WorkerContext, **worker_kwargs)` on `cfg.cluster.num_workers` Ray Train
    workers (torch.distributed initialised: NCCL on GPUs, gloo on CPUs), restarted as a group from
    scratch after a lost worker up to `cluster.max_failures` times; returns Ray Train's Result."""
    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        _train_fn,
        train_loop_config={"cfg": cfg, "worker_fn": worker_fn, "worker_kwargs": worker_kwargs, "use_gpu": use_gpu},
        scaling_config=ScalingConfig(
            num_workers=c.num_workers, use_gpu=use_gpu, resources_per_worker=resources, placement_strategy=c.placement_strategy
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=ray_storage_path(cfg),
            failure_config=FailureConfig(max_failures=c.max_failures, controller_failure_limit=c.startup_retries),
            checkpoint_config=CheckpointConfig(num_to_keep=max(cfg.checkpoint.keep_last, 1)),
        ),
    )
    return trainer.fit()


def run_training(
    cfg,
    method_factory: Callable[[Any], Any],
    *,
    reader_factory: Optional[Callable[[Any, int, int], Any]] = None,
) -> RunResult:
    """Train `method_factory(cfg)` on a Ray Train pool; returns where the run lives and its last metrics.

    `reader_factory(cfg, rank, world_size)` replaces the default `ShardReader` over `cfg.data`.
    """
    from cluster.worker_loop import train_worker

    cfg, store, use_gpu = prepare_run(cfg)
    result = run_pool(cfg, use_gpu, train_worker, {"method_factory": method_factory, "reader_factory": reader_factory})
    ref = store.latest_complete()
    metrics = dict(result.metrics or {})
    return RunResult(
        run_url=store.run_url,
        step=ref.step if ref else int(metrics.get("step", 0)),
        metrics=metrics,
        checkpoint_url=ref.url if ref else None,
        export_url=store.url("export") if cfg.checkpoint.export else None,
        ray_result=result,
    )
