"""Training one run of any registered method on a Ray Train pool (the driver's side):

    job = resolve_job(exp)            # the method, its data (the registered source) and checks: before Ray
    result = run_training(exp, job)   # Ray up, the pool runs the one rank loop (cluster/loop.py)
    summary = report_run(exp, result) # cluster/results.py: the method's report + <run>/result.json

`train(exp)` is the three in a row, and what a training job and a pipeline's training step run.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import ray

from cluster.cli import RunFinished
from cluster.console import say
from cluster.job import TrainJob
from cluster.paths import check_writable, nothing_left_if_refused, resolve_paths, run_url
from cluster.runtime import (check_extension_locks, check_local_resources, check_resources, check_storage_shared, init_ray,
                             resolve_use_gpu, worker_nodes)
from cluster.train_pool import data_workers, run_pool
from system.config import ConfigError, Experiment, to_yaml
from system.data.sources import ActorFedSource, SourceFactory


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


def resolve_job(exp: Experiment, source: Optional[SourceFactory] = None, micro_batch_size: Optional[int] = None) -> TrainJob:
    """The method registered for `type(exp.method)`, the data it declares (or `source`), checked and
    described (`check`, `resolve`), and the method's own checks against it: before Ray starts."""
    from system.methods import registry

    entry = registry.for_config(exp.method)
    source = source if source is not None else entry.source
    source.check(exp)
    data = source.resolve(exp)
    entry.method.check(exp.method, data)
    if micro_batch_size is None:
        micro_batch_size = source.micro_batch_size(exp) if isinstance(source, ActorFedSource) else exp.data.batch_size
    return TrainJob(method=entry.method, data=data, source=source, micro_batch_size=micro_batch_size,
                    submission=uuid.uuid4().hex)


def prepare_run(exp: Experiment, extra_cpus: float = 0.0, extra_gpus: float = 0.0) -> tuple[Experiment, Any, bool]:
    """Before any actor starts: absolute local paths, refuse to overwrite a checkpointed run unless
    `checkpoint.resume`, start/join Ray, check the pool (plus `extra_*` resources of other actors)
    fits, save the resolved config. Returns (exp, store, use_gpu). A refusal (a `ConfigError`, any
    error before the config is saved) leaves no trace of a new run (`nothing_left_if_refused`)."""
    exp = resolve_paths(exp)
    with nothing_left_if_refused(exp, unless=(RunFinished,)):
        return _prepare(exp, extra_cpus, extra_gpus)


def _prepare(exp: Experiment, extra_cpus: float, extra_gpus: float) -> tuple[Experiment, Any, bool]:
    from cluster.checkpoint import CheckpointStore
    from cluster.console import setup_driver_logging

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


def run_training(exp: Experiment, job: Optional[TrainJob] = None, *, extra_cpus: float = 0.0, extra_gpus: float = 0.0) -> RunResult:
    """Train `exp`'s method (`job`, default `resolve_job(exp)`) on a Ray Train pool with the one rank
    loop (cluster/loop.py); returns where the run lives and its last metrics. A source whose batches
    an actor pool makes (`ActorFedSource`) gets its actors first (counted in the resource check),
    bound for every rank (cluster/rollout_pool.py), and its probe before and after training."""
    job = job or resolve_job(exp)
    fed = job.source if isinstance(job.source, ActorFedSource) else None
    if fed is not None:
        spec = fed.actors(exp)
        extra_cpus, extra_gpus = extra_cpus + spec.num_actors * spec.cpus, extra_gpus + spec.num_actors * spec.gpus
    exp, store, use_gpu = prepare_run(exp, extra_cpus, extra_gpus)
    from cluster.loop import train_loop

    extra: dict[str, Any] = {}
    if fed is None:
        result = run_pool(exp, use_gpu, train_loop, {"job": job})
    else:
        result, extra = _run_fed(exp, job, fed, store, use_gpu)
    ref = store.latest_complete()
    metrics = {**dict(result.metrics or {}), **extra}
    return RunResult(
        run_url=store.run_url,
        step=ref.step if ref else int(metrics.get("step", 0)),
        metrics=metrics,
        checkpoint_url=ref.url if ref else None,
        export_url=store.url("export") if exp.checkpoint.export else None,
        ray_result=result,
    )


def _run_fed(exp: Experiment, job: TrainJob, fed: ActorFedSource, store: Any, use_gpu: bool) -> tuple[Any, dict]:
    """The training pool fed by `fed`'s actors; (Ray's result, the run's extra metrics: the probe
    before/after as `<probe_name>_start/_end`, the source's numbers, learner restarts)."""
    from cluster.loop import SESSIONS_FILE, train_loop
    from cluster.rollout_pool import FedPool, fault_dir

    pool = FedPool(exp, fed, fault_dir(store))
    try:
        start = pool.probe_start(store)
        result = run_pool(exp, use_gpu, train_loop, {"job": pool.bind(job)})
        end = pool.probe_end(store.url("export") if exp.checkpoint.export else None)
    finally:
        pool.close()
    source = json.loads(store.read_bytes("metrics.json") or b"{}").get("source", {})
    sessions = [r for r in store.read_jsonl(SESSIONS_FILE) if r["submission"] == job.submission]
    extra = {k: v for k, v in source.items() if isinstance(v, (int, float))}
    extra["learner_restarts"] = max(len(sessions) - 1, 0)
    if fed.probe_name:
        extra.update({f"{fed.probe_name}_start": start, f"{fed.probe_name}_end": end})
    return result, extra


def train_or_finished(exp: Experiment, job: Optional[TrainJob] = None) -> RunResult:
    """`run_training`, or for a run already at `train.max_steps` with its export (a job killed
    after training, before its report) the RunResult of what is there (no metrics)."""
    try:
        return run_training(exp, job)
    except RunFinished as e:
        from cluster.checkpoint import CheckpointStore

        say(str(e).split(":")[0] + ": using its checkpoint and export")
        exp = resolve_paths(exp)
        store = CheckpointStore(run_url(exp), exp.data.storage)
        ref = store.latest_complete()
        return RunResult(run_url=store.run_url, step=ref.step, metrics={}, checkpoint_url=ref.url,
                         export_url=store.url("export"))


def train(exp: Experiment, job: Optional[TrainJob] = None, title: str = "", extra: Optional[dict] = None,
          finished_ok: bool = False) -> dict:
    """Train (`run_training`; with `finished_ok` a finished run is reported as it is), then the
    method's report and `<run>/result.json` (cluster/results.py); returns the summary written there."""
    from cluster.results import report_run

    result = train_or_finished(exp, job) if finished_ok else run_training(exp, job)
    return report_run(exp, result, title or f"[{exp.run_name}] done", extra)
