"""The Ray Train pool: `run_pool(exp, use_gpu, worker_fn, kwargs)` runs a worker function (the one
rank loop `cluster.loop.train_loop`, for every method: cluster/training.py) on
`exp.cluster.num_workers` workers (GPU/NCCL or CPU/gloo) under a `TorchTrainer` whose
`FailureConfig(max_failures)` restarts the pool after a lost worker; every (re)start resumes from
the newest complete checkpoint in our store, so resubmitting the same `run_name` continues too.

Ray Train V2 keeps metrics only when reported with a checkpoint, and `report` is a barrier: the
workers report once per commit, rank 0 with a tiny Ray checkpoint that points at ours. An error
that a restart would meet again (`REFUSALS`: a config error, no intact checkpoint) is not left to
Ray Train's restarts: the ranks tell the driver and end, and the driver raises it (`refuse`).
Ray Train's own storage is the run's storage (`<run>/ray_train`, for object storage through our retrying
filesystem): rank 0 may run on any node (on KubeRay the head has no CPUs), and nothing the run needs
lives on the head's disk.

Each rank reserves `runtime.rank_cpus` CPUs: `cluster.cpus_per_worker`, or its process plus its
`data.num_workers` DataLoader processes when that is more.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Optional

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cluster.integrity import NoIntactCheckpoint
from cluster.runtime import bind_to_cores, rank_cpus
from system.config import ConfigError, Experiment
from system.data.storage import assume_reachable, filesystem, join, protocol

POINTER_FILE = "checkpoint_pointer.json"


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


def _preemption_poll(every: int = 10) -> Callable[[], bool]:
    """`WorkerContext.preempted` under Ray Train: whether a node of the run is about to be preempted
    (`ray.train.get_preemption_info`, a barrier over the workers: asked on every `every`-th call, the
    same calls on every rank since the loop polls once per step; the last answer in between)."""
    calls, last = [0], [False]

    def poll() -> bool:
        if calls[0] % every == 0:
            last[0] = ray.train.get_preemption_info() is not None
        calls[0] += 1
        return last[0]

    return poll


def _train_fn(config: dict[str, Any]) -> None:  # Ray Train's train_loop_config
    """Ray Train worker entry: environment first (DeepSpeed reads DS_ACCELERATOR at import), then
    `worker_fn(exp, WorkerContext, **worker_kwargs)`."""
    import torch

    use_gpu, exp, ctx = config["use_gpu"], config["exp"], ray.train.get_context()
    # the driver has listed the run on this storage: an outage from the first request on is waited out
    assume_reachable(exp.data.storage)
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
        # one intra-op thread per CPU Ray reserved for this worker: Ray sets OMP_NUM_THREADS only when the
        # environment has none, and an inherited value would oversubscribe the node's cores N workers times
        torch.set_num_threads(max(1, int(exp.cluster.cpus_per_worker)))
        # each rank on its own cores when the node's ranks fill them (runtime.rank_cores)
        bind_to_cores(ctx.get_local_rank(), ctx.get_local_world_size(), rank_cpus(exp.cluster, data_workers(exp)))
    from ray.train.torch import get_device

    from cluster.loop import WorkerContext

    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device() if use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    board = config.get("board")
    progress = (lambda e: board.push.remote(e)) if board is not None and rank == 0 else (lambda e: None)
    wctx = WorkerContext(rank=rank, world_size=world, device=device, report=_ray_report(rank), progress=progress,
                         preempted=_preemption_poll())
    from cluster.console import worker_output
    from cluster.paths import run_url

    # the console shows the driver's bar; worker output goes to <run>/logs/rank_<r>.log (unless verbose)
    with worker_output(run_url(exp), rank, exp.data.storage, verbose=exp.logging.verbose):
        try:
            config["worker_fn"](exp, wctx, **config["worker_kwargs"])
        except REFUSALS as e:
            refuse(board, rank, e)


# errors a restart of the pool would meet again (bad config, nothing intact to resume from): the
# driver raises them as a ConfigError instead of restarting (`refuse`)
REFUSALS = (ConfigError, NoIntactCheckpoint)


def refuse(board: Any, rank: int, error: BaseException) -> None:
    """A rank met `error`, one of `REFUSALS`: its one line goes to the rank's log and to the driver
    (the board: `ConsoleProgress.refused`, waited for), and the rank's training function returns
    without raising, so Ray Train ends the run instead of restarting it for an error that would
    repeat; the driver then raises it as a ConfigError (`run_with_progress`). Without a board (no
    driver to tell) the error is raised."""
    print(f"config error: {error}", flush=True)
    if board is None:
        raise error
    ray.get(board.push.remote({"kind": "refused", "rank": rank, "message": str(error)}))


def ray_storage(exp: Experiment) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train's own run state: `<run>/ray_train`, in the
    run's own storage. Object storage: our retrying fsspec filesystem (`data.storage`) as a pyarrow
    filesystem, so every node reaches it as the run does (and waits out an outage like the run)."""
    sp = exp.checkpoint.storage_path
    if protocol(sp) == "file":
        return os.path.join(sp.removeprefix("file://"), exp.run_name, "ray_train"), None
    import pyarrow.fs

    fs, path = filesystem(join(sp, exp.run_name, "ray_train"), exp.data.storage, assume_reachable=True)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def worker_resources(exp: Experiment, use_gpu: bool) -> dict[str, float]:
    """Ray resources of one training rank: `rank_cpus` CPUs (its process and its `data.num_workers`
    DataLoader processes, at least `cluster.cpus_per_worker`) and `cluster.gpus_per_worker` GPUs."""
    c = exp.cluster
    cpus = rank_cpus(c, data_workers(exp))
    return {"CPU": cpus, **({"GPU": c.gpus_per_worker} if use_gpu else {})}


def data_workers(exp: Experiment) -> int:
    """DataLoader processes of one rank (`data.num_workers`; 0 for a job without a data section)."""
    return int(getattr(getattr(exp, "data", None), "num_workers", 0) or 0)


def run_pool(exp: Experiment, use_gpu: bool, worker_fn: Callable[..., Any], worker_kwargs: dict) -> Any:
    """`worker_fn(exp, WorkerContext, **worker_kwargs)` on `exp.cluster.num_workers` Ray Train
    workers (torch.distributed initialised: NCCL on GPUs, gloo on CPUs), restarted as a group from
    scratch after a lost worker up to `cluster.max_failures` times; returns Ray Train's Result."""
    from cluster.console import ConsoleProgress, ProgressBoard, run_with_progress

    c = exp.cluster
    resources = worker_resources(exp, use_gpu)
    storage_path, storage_fs = ray_storage(exp)
    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    trainer = TorchTrainer(
        _train_fn,
        train_loop_config={"exp": exp, "worker_fn": worker_fn, "worker_kwargs": worker_kwargs, "use_gpu": use_gpu,
                           "board": board},
        scaling_config=ScalingConfig(
            num_workers=c.num_workers, use_gpu=use_gpu, resources_per_worker=resources, placement_strategy=c.placement_strategy
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=exp.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=c.max_failures, controller_failure_limit=c.startup_retries),
            checkpoint_config=CheckpointConfig(num_to_keep=max(exp.checkpoint.keep_last, 1)),
        ),
    )
    progress = ConsoleProgress(board, exp.run_name, exp.train.max_steps, enabled=exp.logging.progress)
    try:
        return run_with_progress(trainer.fit, progress)
    finally:
        ray.kill(board)
