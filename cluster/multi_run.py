"""Several training runs side by side in one driver (e.g. AR sizes S and L on the same token shards):
each run is its own Ray Train run (placement group, worker group, storage folder, wandb run) started
from its own driver thread through `cluster.training.run_training`; a run that fails (bad config,
crash beyond `cluster.max_failures`) does not stop the others. Ray is joined or started once for
all of them, with their summed resources checked first when it is started here.

    runs = expand_runs(ARExperiment, argv, DEFAULTS, base)         # {run_name: Experiment | ConfigError}
    outcomes = run_side_by_side(runs, job_for=resolve_job, group=base.run_name)
    print(outcome_table(outcomes, ["loss", "acc", "tokens_per_s"]))

A job's `runs.<name>` (`system.config.RunSpec`: a size preset and dotted overrides) becomes the run
`<run_name>-<name>`: the job's own config (defaults, files, command line) plus those changes, checked
like any config. Re-running the job resumes every run from its own newest checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from cluster.console import say, shared_driver_log
from cluster.job import TrainJob
from system.config import ConfigError, Experiment, load_config

log = logging.getLogger("tokenizer_ar")


@dataclass
class RunOutcome:
    """How one run of a side-by-side job ended."""

    name: str
    status: str  # "done" | "finished" (already at train.max_steps: nothing to do) | "failed"
    result: Any = None  # cluster.training.RunResult when it ran
    error: Optional[str] = None  # one line
    config_error: bool = False  # the failure is a ConfigError (found before Ray started, or while preparing)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def expand_runs(schema: type, argv: Sequence[str], defaults: Sequence[str], base: Experiment) -> dict[str, Any]:
    """`base.runs` -> {run name: its Experiment, or the ConfigError of its config}; a job without
    `runs` is the one run `base`. Each run is loaded like the job (schema defaults, `defaults`, the
    command line) plus `run_name=<run_name>-<name>`, `method.model=<model>` and its overrides."""
    specs = getattr(base, "runs", None) or {}
    if not specs:
        return {base.run_name: base}
    out: dict[str, Any] = {}
    for key, spec in specs.items():
        name = f"{base.run_name}-{key}"
        extra = [f"run_name={json.dumps(name)}"] + ([f"method.model={json.dumps(spec.model)}"] if spec.model else [])
        extra += [f"{k}={json.dumps(v)}" for k, v in spec.overrides.items()]
        try:
            exp = load_config(schema, [*argv, *extra], defaults)
            out[name] = dataclasses.replace(exp, runs={})
        except ConfigError as e:
            out[name] = ConfigError(f"runs.{key}: {e}")
    return out


def _resources(exps: dict[str, Experiment], use_gpu: bool) -> tuple[float, float, str]:
    from cluster.runtime import rank_cpus
    from cluster.train_pool import data_workers

    per_rank = {n: rank_cpus(e.cluster, data_workers(e)) for n, e in exps.items()}  # what each pool reserves
    cpus = sum(e.cluster.num_workers * per_rank[n] for n, e in exps.items())
    gpus = sum(e.cluster.num_workers * e.cluster.gpus_per_worker for e in exps.values()) if use_gpu else 0.0
    each = ", ".join(f"{n}: {e.cluster.num_workers} x {per_rank[n]:g} CPU" for n, e in exps.items())
    return cpus, gpus, each


def start_ray(exps: dict[str, Experiment]) -> None:
    """Join or start Ray once for all runs; a Ray started here must hold all their pools at once."""
    import ray

    from cluster.runtime import check_extension_locks, init_ray, resolve_use_gpu

    first = next(iter(exps.values()))
    c = first.cluster
    started_here = not ray.is_initialized() and not (c.address or os.environ.get("RAY_ADDRESS"))
    if started_here:
        need, _, each = _resources(exps, use_gpu=False)
        have = c.local_num_cpus or os.cpu_count() or 1
        if need > have:
            raise ConfigError(f"the runs need {need:g} CPUs side by side ({each}) but the local Ray gets {have} "
                              "(cluster.local_num_cpus or this machine's CPU count): lower cluster.num_workers of the "
                              "runs, run fewer at once, or join a cluster (cluster.address)")
        check_extension_locks()
    init_ray(c, verbose=first.logging.verbose)
    if started_here:
        res = ray.cluster_resources()
        cpus, gpus, each = _resources(exps, resolve_use_gpu(c))
        if cpus > res.get("CPU", 0) or gpus > res.get("GPU", 0):
            raise ConfigError(f"the runs need {cpus:g} CPUs and {gpus:g} GPUs side by side ({each}); the Ray cluster "
                              f"has {res.get('CPU', 0):g} and {res.get('GPU', 0):g}")


def _one_line(e: BaseException, limit: int = 300) -> str:
    """`Type: first line`, plus the last line when the message has more (e.g. a worker's exception)."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1:
        text += f" ... {lines[-1]}"
    return f"{type(e).__name__}: {text}"[:limit]


def run_side_by_side(runs: dict[str, Any], job_for: Callable[[Experiment], TrainJob], group: str = "runs",
                     poll_s: float = 1.0) -> list[RunOutcome]:
    """Every run of `runs` ({name: Experiment, or the exception its config raised}) trained at once,
    one driver thread each calling `run_training(exp, job_for(exp))`; the outcomes in `runs` order.
    `job_for` (e.g. `resolve_job`) runs for every run before Ray starts: a run whose config it
    rejects fails alone. With more than one run, the per-run progress bars are off (checkpoint lines
    stay) and the driver's log is `<storage>/<group>/logs/driver.log` (uploaded there for object storage)."""
    from cluster.cli import RunFinished
    from cluster.paths import resolve_paths
    from cluster.training import run_training
    from system.data.storage import join

    outcomes: dict[str, RunOutcome] = {}
    ready: dict[str, tuple[Experiment, TrainJob]] = {}
    for name, exp in runs.items():
        if isinstance(exp, BaseException):
            outcomes[name] = RunOutcome(name, "failed", error=str(exp), config_error=isinstance(exp, ConfigError))
            continue
        try:
            ready[name] = (exp, job_for(exp))
        except ValueError as e:  # ConfigError included: the method's checks against the data
            outcomes[name] = RunOutcome(name, "failed", error=str(e), config_error=True)
    if not ready:
        return [outcomes[n] for n in runs]
    for name, o in outcomes.items():  # the others still run
        say(f"[{name}] not started: {o.error}")
    if len(ready) > 1:  # several tqdm bars from threads would overwrite each other
        ready = {n: (dataclasses.replace(e, logging=dataclasses.replace(e.logging, progress=False)), j)
                 for n, (e, j) in ready.items()}
    first = resolve_paths(next(iter(ready.values()))[0])
    log_dir = join(first.checkpoint.storage_path, group) if len(ready) > 1 else None
    with shared_driver_log(log_dir, first.logging.verbose, first.data.storage) if log_dir else contextlib.nullcontext():
        try:
            start_ray({n: e for n, (e, _) in ready.items()})
        except ConfigError as e:
            for n in ready:
                outcomes[n] = RunOutcome(n, "failed", error=str(e), config_error=True)
            return [outcomes[n] for n in runs]
        if len(ready) > 1:
            say(f"[{group}] {len(ready)} runs side by side: {', '.join(ready)}")

        def target(name: str, exp: Experiment, job: TrainJob) -> None:
            t0 = time.perf_counter()
            try:
                res = run_training(exp, job)
                outcomes[name] = RunOutcome(name, "done", result=res)
            except RunFinished as e:
                say(str(e))
                outcomes[name] = RunOutcome(name, "finished")
            except BaseException as e:  # noqa: BLE001 - one run's failure never stops the others
                log.error("run %s failed:\n%s", name, traceback.format_exc())
                outcomes[name] = RunOutcome(name, "failed", error=_one_line(e), config_error=isinstance(e, ConfigError))
                say(f"[{name}] failed: {_one_line(e)}")
            outcomes[name].seconds = time.perf_counter() - t0

        threads = [threading.Thread(target=target, args=(n, e, j), name=f"run-{n}", daemon=True)
                   for n, (e, j) in ready.items()]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(poll_s)
    return [outcomes[n] for n in runs]


def outcome_table(outcomes: Sequence[RunOutcome], keys: Sequence[str] = ("loss",)) -> str:
    """One row per run: status, step, the metrics `keys`, seconds, then its export (or its error)."""
    keys = [k for k in keys if any(k in (getattr(o.result, "metrics", None) or {}) for o in outcomes)]  # e.g. no mfu on CPU
    head = ["run", "status", "step", *keys, "time (s)", "export / error"]
    rows = []
    for o in outcomes:
        m = dict(getattr(o.result, "metrics", None) or {})
        step = getattr(o.result, "step", "")
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
        tail = o.error if not o.ok else (getattr(o.result, "export_url", None) or "")
        rows.append([o.name, o.status, str(step), *(fmt(m.get(k)) for k in keys), f"{o.seconds:.0f}", tail or ""])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    line = lambda r: "  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]])  # noqa: E731
    return "\n".join([line(head), *(line(r) for r in rows)])


def exit_status(outcomes: Sequence[RunOutcome]) -> int:
    """0 when every run succeeded (or was already finished); 2 when every run failed on its config
    (nothing ran); 1 when some run failed."""
    if all(o.ok for o in outcomes):
        return 0
    return 2 if all(o.config_error for o in outcomes) else 1
