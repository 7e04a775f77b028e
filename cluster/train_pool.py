"""The Ray Train pool: `run_pool(exp, use_gpu, worker_fn, kwargs)` runs a worker function (the one
rank loop `cluster.loop.train_loop` via `run_training`, for every method) on
`exp.cluster.num_workers` workers (GPU/NCCL or CPU/gloo) under a `TorchTrainer` whose
`FailureConfig(max_failures)` restarts the pool after a lost worker; every (re)start resumes from
the newest complete checkpoint in our store, so resubmitting the same `run_name` continues too.

Ray Train V2 keeps metrics only when reported with a checkpoint, and `report` is a barrier: the
workers report once per commit, rank 0 with a tiny Ray checkpoint that points at ours. Ray Train's
own storage is the run's storage (`<run>/ray_train`, for object storage through our retrying
filesystem): rank 0 may run on any node (on KubeRay the head has no CPUs), and nothing the run needs
lives on the head's disk. A local `checkpoint.storage_path` on a multi-node cluster must be declared
the same folder on every node (`checkpoint.shared`), else the run stops at start-up.

Each rank reserves `runtime.rank_cpus` CPUs: `cluster.cpus_per_worker`, or its process plus its
`data.num_workers` DataLoader processes when that is more.
"""
from __future__ import annotations

import json
import os
import tempfile
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cluster.job import ImageShards, SourceFactory, TrainJob
from cluster.console import say
from cluster.runtime import (check_extension_locks, check_local_resources, check_resources, check_storage_shared, init_ray,
                             rank_cpus, resolve_use_gpu, worker_nodes)
from system.config import ConfigError, Experiment, to_yaml
from system.data.storage import assume_reachable, filesystem, join, protocol

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


def resolve_paths(exp: Experiment) -> Experiment:
    """A copy of `exp` whose local storage path is absolute (workers may run in another folder)."""
    sp = exp.checkpoint.storage_path
    if protocol(sp) == "file" and not sp.startswith("file://"):
        exp = replace(exp, checkpoint=replace(exp.checkpoint, storage_path=os.path.abspath(os.path.expanduser(sp))))
    return exp


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

    use_gpu = config["use_gpu"]
    # the driver has listed the run on this storage: an outage from the first request on is waited out
    assume_reachable(config["exp"].data.storage)
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
        # one intra-op thread per CPU Ray reserved for this worker: Ray sets OMP_NUM_THREADS only when the
        # environment has none, and an inherited value would oversubscribe the node's cores N workers times
        torch.set_num_threads(max(1, int(config["exp"].cluster.cpus_per_worker)))
    from ray.train.torch import get_device

    from cluster.loop import WorkerContext

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device() if use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    exp = config["exp"]
    board = config.get("board")
    progress = (lambda e: board.push.remote(e)) if board is not None and rank == 0 else (lambda e: None)
    wctx = WorkerContext(rank=rank, world_size=world, device=device, report=_ray_report(rank), progress=progress,
                         preempted=_preemption_poll())
    from cluster.console import worker_output
    from cluster.loop import run_url

    # the console shows the driver's bar; worker output goes to <run>/logs/rank_<r>.log (unless verbose)
    with worker_output(run_url(exp), rank, exp.data.storage, verbose=exp.logging.verbose):
        config["worker_fn"](exp, wctx, **config["worker_kwargs"])


class RunFinished(Exception):
    """The run already reached `train.max_steps` and has its export: nothing to do (not an error)."""


def job_config(schema: type, argv: list[str], defaults: list[str], check: Optional[Callable[[Any], None]] = None) -> Any:
    """A training job's config from its command line: parse it (`--help`; exit 2 on a bad key or
    value), build the embedded photo set when `data.embedded`, then `check(cfg)` (exit 2): all before
    any Ray resource is touched."""
    from system.config import cli_config, exit_on_config_error
    from system.data.embedded import ensure_embedded_data

    cfg = cli_config(schema, argv, defaults)
    exit_on_config_error(lambda: ensure_embedded_data(cfg.data))
    if check is not None:
        exit_on_config_error(lambda: check(cfg))
    return cfg


def run_job(fn: Callable[[], Any]) -> Any:
    """A job's run: a finished run says so and exits 0; a `ConfigError` found while starting (storage,
    resources, an existing run) prints one line and exits 2 (`--debug`: the traceback)."""
    from system.config import exit_on_config_error

    try:
        return exit_on_config_error(lambda: _only_config_errors(fn))
    except RunFinished as e:
        say(str(e))
        raise SystemExit(0) from None


def _only_config_errors(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except ConfigError:
        raise
    except ValueError as e:  # not a config problem: keep its traceback
        raise RuntimeError(f"{type(e).__name__}: {e}") from e


def check_writable(exp: Experiment) -> None:
    """A local `checkpoint.storage_path` must be a folder this process can write (before Ray starts)."""
    run_dir = local_run_dir(exp)
    if run_dir is None:
        return
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write-probe-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"config key 'checkpoint.storage_path' = {exp.checkpoint.storage_path!r}: cannot write the run "
                          f"folder {run_dir} ({e.strerror or e}); choose a writable folder or s3://bucket/prefix") from None


def local_run_dir(exp: Experiment) -> Optional[str]:
    """The run's folder when its storage is local (None for object storage)."""
    sp = exp.checkpoint.storage_path
    return os.path.join(sp.removeprefix("file://"), exp.run_name) if protocol(sp) == "file" else None


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


def prepare_run(exp: Experiment, extra_cpus: float = 0.0, extra_gpus: float = 0.0) -> tuple[Experiment, Any, bool]:
    """Before any actor starts: absolute local paths, refuse to overwrite a checkpointed run unless
    `checkpoint.resume`, start/join Ray, check the pool (plus `extra_*` resources of other actors)
    fits, save the resolved config. Returns (exp, store, use_gpu)."""
    from cluster.checkpoint import CheckpointStore
    from cluster.loop import run_url

    from cluster.console import setup_driver_logging

    exp = resolve_paths(exp)
    c = exp.cluster
    check_writable(exp)
    log_file = setup_driver_logging(run_url(exp), exp.logging.verbose, exp.data.storage)
    store = CheckpointStore(run_url(exp), exp.data.storage)
    try:
        existing = store.latest_complete()  # before any resource is allocated
    except Exception as e:  # noqa: BLE001 - an unreachable store is a config problem, said in one line
        raise ConfigError(f"config key 'checkpoint.storage_path': cannot list the run's checkpoints at {store.run_url}: {e}") from None
    if existing is not None and not exp.checkpoint.resume:
        raise ConfigError(
            f"run {exp.run_name!r} already has a checkpoint at step {existing.step} ({existing.url}); "
            "set checkpoint.resume=true to continue it, or choose another run_name"
        )
    if existing is not None and existing.step >= exp.train.max_steps and (not exp.checkpoint.export or store.exists("export/model.json")):
        raise RunFinished(
            f"run {exp.run_name!r} is already at step {existing.step} >= train.max_steps={exp.train.max_steps}: nothing "
            f"to train, and its export is left as it is ({store.url('export')}). To train it further, raise "
            f"train.max_steps; to start a new run, set another run_name (e.g. run_name={exp.run_name}-2)")
    started_here = not ray.is_initialized() and not (c.address or os.environ.get("RAY_ADDRESS"))
    if started_here:
        check_local_resources(c, extra_cpus, data_workers=data_workers(exp))
        check_extension_locks()
    init_ray(c, verbose=exp.logging.verbose)
    check_storage_shared(exp.checkpoint.storage_path, exp.checkpoint.shared, *worker_nodes())
    use_gpu = resolve_use_gpu(c)
    if started_here:
        check_resources(c, use_gpu, extra_cpus=extra_cpus, extra_gpus=extra_gpus, data_workers=data_workers(exp))
    store.write_bytes("config.yaml", to_yaml(exp).encode())
    say(f"[{exp.run_name}] {c.num_workers} {'GPU' if use_gpu else 'CPU'} worker(s), DeepSpeed ZeRO-{exp.deepspeed.zero_stage}, "
        f"{exp.train.max_steps} steps; run: {store.run_url}" + (f" (logs: {os.path.dirname(log_file)}/)" if log_file else ""))
    return exp, store, use_gpu


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


def resolve_job(exp: Experiment, source: Optional[SourceFactory] = None, micro_batch_size: Optional[int] = None) -> TrainJob:
    """The method registered for `type(exp.method)`, its data spec and checks (before Ray starts)."""
    from system.data.shards import check_shard_set
    from system.methods import registry

    if source is None or isinstance(source, ImageShards):  # the job reads image shards: they must be there
        check_shard_set(exp.data.url, "data.url", exp.data.storage)
        if exp.data.val_url:
            check_shard_set(exp.data.val_url, "data.val_url", exp.data.storage)
    method = registry.for_config(exp.method).method
    data = method.resolve_data(exp)
    method.check(exp.method, data)
    return TrainJob(method=method, data=data, source=source or ImageShards(),
                    micro_batch_size=micro_batch_size or exp.data.batch_size, submission=uuid.uuid4().hex)


def run_training(exp: Experiment, job: Optional[TrainJob] = None, *, extra_cpus: float = 0.0, extra_gpus: float = 0.0) -> RunResult:
    """Train `exp`'s method (`job`, default `resolve_job(exp)`) on a Ray Train pool with the one rank
    loop (cluster/loop.py); returns where the run lives and its last metrics."""
    job = job or resolve_job(exp)
    exp, store, use_gpu = prepare_run(exp, extra_cpus, extra_gpus)
    from cluster.loop import train_loop

    result = run_pool(exp, use_gpu, train_loop, {"job": job})
    ref = store.latest_complete()
    metrics = dict(result.metrics or {})
    return RunResult(
        run_url=store.run_url,
        step=ref.step if ref else int(metrics.get("step", 0)),
        metrics=metrics,
        checkpoint_url=ref.url if ref else None,
        export_url=store.url("export") if exp.checkpoint.export else None,
        ray_result=result,
    )


def train_or_finished(exp: Experiment, job: Optional[TrainJob] = None) -> RunResult:
    """`run_training`, or for a run already at `train.max_steps` with its export (a job killed
    after training, before its report) the RunResult of what is there (no metrics)."""
    try:
        return run_training(exp, job)
    except RunFinished as e:
        from cluster.checkpoint import CheckpointStore
        from cluster.loop import run_url

        say(str(e).split(":")[0] + ": using its checkpoint and export")
        exp = resolve_paths(exp)
        store = CheckpointStore(run_url(exp), exp.data.storage)
        ref = store.latest_complete()
        return RunResult(run_url=store.run_url, step=ref.step, metrics={}, checkpoint_url=ref.url,
                         export_url=store.url("export"))


def val_history(run: str, storage: Any) -> dict[str, float]:
    """The last value of every validation metric (`val*/...`) in `<run>/metrics.jsonl` (all
    sessions of the run: the untrained baseline `val_start/*` is logged by the first)."""
    from system.data.storage import exists, read_bytes

    url = f"{run.rstrip('/')}/metrics.jsonl"
    out: dict[str, float] = {}
    if not exists(url, storage):
        return out
    for line in read_bytes(url, storage).decode().splitlines():
        row = json.loads(line) if line.strip() else {}
        out.update({k: v for k, v in row.items() if k.startswith("val") and "/" in k})
    return out


def write_run_result(result: RunResult, storage: Any, extra: Optional[dict] = None) -> dict:
    """`<run>/result.json` (written last: the run's "done" marker for pipelines): where the run, its
    checkpoint and export are, its last metrics, and `extra`; returns that summary."""
    from system.data.storage import write_bytes_atomic

    summary = {**(extra or {}), "run": result.run_url, "step": result.step, "checkpoint": result.checkpoint_url,
               "export": result.export_url, "metrics": result.metrics}
    write_bytes_atomic(f"{result.run_url}/result.json", json.dumps(summary, indent=1, default=str).encode(), storage)
    return summary


def report_tokenizer_run(exp: Experiment, result: RunResult, keys: tuple[str, ...], title: str,
                         summary_extra: Optional[dict] = None, others: Optional[dict[str, str]] = None) -> dict:
    """A tokenizer job's end: the final table (metrics `keys`; the validation the workers ran:
    PSNR untrained -> trained (EMA), next to the runs whose exports `others` names; the run's paths)
    and `<run>/result.json`; returns the summary written there."""
    from cluster.console import table

    m, run, export = result.metrics, result.run_url, result.export_url
    rows = [(k, m[k]) for k in keys if k in m]
    summary = dict(summary_extra or {})
    val = val_history(run, exp.data.storage)
    if "val/psnr" in val:
        summary["validation"] = val
        psnr = {"untrained": val.get("val_start/psnr"), "trained": val["val/psnr"], "trained_ema": val.get("val_ema/psnr")}
        for name, url in (others or {}).items():  # another run's export: that run's own final validation
            theirs = val_history(url.rstrip("/").rsplit("/", 1)[0], exp.data.storage)
            psnr[name] = theirs.get("val_ema/psnr", theirs.get("val/psnr"))
        summary["val_psnr_db"] = psnr = {k: v for k, v in psnr.items() if v is not None}
        fmt = lambda k: f"{psnr[k]:.2f}" if k in psnr else "-"  # noqa: E731
        rows.append(("val PSNR (dB)", f"untrained {fmt('untrained')} -> trained {fmt('trained')} (EMA "
                                      f"{fmt('trained_ema')})" + "".join(f"; {k} {fmt(k)}" for k in others or {})))
        if "val/codebook_usage" in val:  # a tokenizer with codes (not the VAE of jobs/semtok.py)
            rows.append(("val codebook usage", f"{val['val/codebook_usage']:.3f} of the codes over "
                                               f"{val.get('val/images', 0):.0f} images (perplexity "
                                               f"{val.get('val/codebook_perplexity', 0):.1f})"))
    rows += [("checkpoint", result.checkpoint_url), ("export", export), ("sample grid", f"{run}/samples/step_{result.step:08d}.png"),
             ("curves", f"{run}/curves.png"), ("metrics", f"{run}/metrics.jsonl"), ("logs", f"{run}/logs/")]
    summary = write_run_result(result, exp.data.storage, summary)
    print(table(title, rows))
    return summary
