"""Runs any pipeline (system/pipelines/: a list of typed steps) as one resumable job. Each step is
done when its marker exists (the step's own last write: a run's result.json, a shard set's index,
a samples npz, an evaluation report); `run_pipeline` skips the done steps and runs the rest in
order, so a killed job resubmitted continues at the step it was in, and that step continues where
it stopped (a training run from its last checkpoint, an encoding and sampling from their finished
shards/parts). `<root>/pipeline.json` records each step's status, time and summary.

Nothing here knows a method or a paper: a step is run by its kind (train, encode, sample,
evaluate), and a training step through the same driver as a training job (cluster/training.py)."""
from __future__ import annotations

import json
import time
from functools import singledispatch
from typing import Any, Optional, Sequence

from cluster.console import say, table
from system.config import ConfigError, StorageConfig, exit_on_config_error, to_yaml
from system.config.pipelines import ImagePipelineConfig
from system.data.storage import exists, join, read_json, write_bytes_atomic
from system.pipelines.steps import EncodeStep, EvaluateStep, Pipeline, SampleStep, Step, TrainStep


def _write_state(url: str, state: dict, storage: Optional[StorageConfig]) -> None:
    write_bytes_atomic(url, json.dumps(state, indent=1, default=str).encode(), storage)


def run_pipeline(title: str, steps: Sequence[Step], root: str, storage: Optional[StorageConfig] = None,
                 config_yaml: str = "") -> dict:
    """Run the steps not yet done, in order (see module doc); returns the pipeline state
    ({"steps": {name: {"status", "seconds", "summary"}}}) also written to <root>/pipeline.json."""
    url = join(root, "pipeline.json")
    state = read_json(url, storage) if exists(url, storage) else {"steps": {}}
    if config_yaml:
        write_bytes_atomic(join(root, "config.yaml"), config_yaml.encode(), storage)
    for i, step in enumerate(steps, 1):
        entry = state["steps"].setdefault(step.name, {})
        if exists(step.marker, storage):
            say(f"[{title}] step {i}/{len(steps)} {step.name}: done before ({step.marker}), skipped")
            entry["status"] = entry.get("status") or "done"
            continue
        say(f"[{title}] step {i}/{len(steps)} {step.name}: {step.describe or 'running'}")
        entry.update(status="running", started=time.strftime("%Y-%m-%d %H:%M:%S"))
        _write_state(url, state, storage)
        t0 = time.time()
        summary = run_step(step, title)
        entry.update(status="done", seconds=round(time.time() - t0, 1), summary=summary)
        _write_state(url, state, storage)
    _write_state(url, state, storage)
    return state


def run_pipeline_job(pipeline: Pipeline, argv: list[str]) -> int:
    """A pipeline job from its command line: the config (`--help`; exit 2 on a bad key, value or
    wiring), the embedded photos when asked for, the checks of every step whose inputs exist already
    (exit 2, before Ray), then the steps under <storage_path>/<run_name>, the resolved config saved
    there, and the final table; a config error inside a step exits 2."""
    from system.config.load import dry_run_requested
    from system.pipelines.dry_run import check_steps, run_dry

    cfg = pipeline_config(pipeline, argv)
    dry = dry_run_requested(argv)
    steps = exit_on_config_error(lambda: prepare(pipeline, cfg, check=not dry))
    root = pipeline.root(cfg)
    if dry:
        exit_on_config_error(lambda: run_dry(f"[{cfg.run_name}]", steps, root, cfg.storage))
        return 0
    exit_on_config_error(lambda: check_steps(steps))  # the wiring between the steps, before the first one
    state = exit_on_config_error(lambda: run_pipeline(cfg.run_name, steps, root, cfg.storage, to_yaml(cfg)))
    print(state_table(f"[{cfg.run_name}] pipeline done: {root}", state, pipeline.keys))
    if pipeline.report is not None:
        print(pipeline.report(state))
    return 0


def pipeline_config(pipeline: Pipeline, argv: list[str]) -> Any:
    """`pipeline.load(argv)` for a job's command line: `--help` prints every key; a bad config prints
    `config error: ...` and exits 2 before any Ray resource is touched."""
    from system.config.load import HelpRequested, help_files, help_text

    try:
        return exit_on_config_error(lambda: pipeline.load(argv))
    except HelpRequested:
        print(help_text(pipeline.schema, [*pipeline.defaults, *help_files(argv)]))
        raise SystemExit(0) from None


def prepare(pipeline: Pipeline, cfg: ImagePipelineConfig, check: bool = True) -> list[Step]:
    """The steps of `cfg`, after the embedded photo sets are built (when `cfg.embedded`) and (with
    `check`) every step not yet done whose inputs no step of this run makes (they must exist
    already) is checked."""
    from system.data.embedded import ensure_embedded_shards

    if getattr(cfg, "embedded", False):
        ensure_embedded_shards(cfg.images, cfg.val_images, cfg.storage)
    steps = pipeline.steps(cfg)
    names = {s.name for s in steps}
    for step in steps if check else ():  # a step whose inputs no step of this run makes: they must be there now
        if not set(step.needs) & names and not exists(step.marker, getattr(cfg, "storage", None)):
            check_step(step)
    return steps


# --------------------------------------------------------------------------- one step, by kind
@singledispatch
def check_step(step: Step) -> None:
    """ConfigError for a step whose inputs exist and cannot run (before Ray)."""


@check_step.register
def _(step: TrainStep) -> None:
    from system.config.runs import typed_runs
    from cluster.training import resolve_job

    for exp in typed_runs(step.exp).values():
        if isinstance(exp, BaseException):
            raise exp
        resolve_job(exp)


@check_step.register
def _(step: EncodeStep) -> None:
    step.encoding.prepare()


@singledispatch
def run_step(step: Step, title: str) -> dict:
    """Do the step; returns a JSON-friendly summary."""
    raise TypeError(f"no runner for a {type(step).__name__} (step {step.name!r})")


@run_step.register
def _(step: TrainStep, title: str) -> dict:
    if getattr(step.exp, "runs", None):
        return _train_side_by_side(step, title)
    from cluster.training import train

    out = train(step.exp, title=step.title or f"[{title}] {step.name} done", extra={"step_name": step.name},
                finished_ok=True)
    return {**_scalars(out), **_scalars(out.get("metrics") or {})}


def _train_side_by_side(step: TrainStep, title: str) -> dict:
    """An experiment with `runs`: those runs at once (cluster/multi_run.py), each its own result.json;
    the summary holds `<run key>/<metric>`; any failed run stops the pipeline (a re-run continues)."""
    from cluster.multi_run import outcome_table, run_side_by_side
    from system.config.runs import typed_runs
    from cluster.results import write_run_result
    from cluster.training import resolve_job

    runs = typed_runs(step.exp)
    outcomes = run_side_by_side(runs, resolve_job, group=step.exp.run_name)
    print(f"[{title}] {step.name}\n" + outcome_table(outcomes, ("loss", "acc")))
    failed = [o for o in outcomes if not o.ok]
    if failed:
        err = ConfigError if all(o.config_error for o in failed) else RuntimeError
        raise err(f"step {step.name}: run(s) {', '.join(o.name for o in failed)} failed: {failed[0].error}")
    summary: dict = {}
    for o in outcomes:
        key = o.name.removeprefix(f"{step.exp.run_name}-")
        if o.status == "done":
            write_run_result(o.result, runs[o.name].data.storage, {"seconds": o.seconds})
            summary.update({f"{key}/{k}": v for k, v in _scalars(o.result.metrics).items()})
            summary[f"{key}/export"] = o.result.export_url
    return summary


@run_step.register
def _(step: EncodeStep, title: str) -> dict:
    from cluster.encode_pool import run_encoding

    enc = step.encoding.prepare()
    s = run_encoding(enc)
    say(table(f"{enc.title}: done -> {enc.cfg.out}", enc.rows(s)))
    return enc.summary(s)


@run_step.register
def _(step: SampleStep, title: str) -> dict:
    from cluster.runtime import init_ray
    from cluster.sample_pool import run_sampling

    init_ray(step.cfg.cluster)
    s = run_sampling(step.cfg)
    say(table(f"{step.name}: done", [(k, s[k]) for k in ("samples", "num_images", "images_per_s")] +
              [("grids", ", ".join(s["grids"][:2]))]))
    return {k: s[k] for k in ("samples", "num_images", "images_per_s", "grids")}


@run_step.register
def _(step: EvaluateStep, title: str) -> dict:
    from cluster.eval_pool import evaluate
    from system.eval.report import flat_metrics, format_table

    report = evaluate(step.cfg)
    write_bytes_atomic(join(step.cfg.out, "report.json"), json.dumps(report, indent=1).encode(), step.cfg.storage)
    print(format_table(report))
    return _scalars(flat_metrics(report), str)


def _scalars(d: dict, *also: type) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, *also)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------- the final table
def state_table(title: str, state: dict, keys: dict[str, Sequence[str]]) -> str:
    """The final table: each step's status, time and the summary values named in `keys[step]`."""
    rows = []
    for name, e in state["steps"].items():
        s = e.get("summary") or {}
        vals = ", ".join(f"{k} {_fmt(s[k])}" for k in keys.get(name, ()) if s.get(k) is not None)
        secs = f"{e['seconds']:.0f} s" if "seconds" in e else "earlier run"
        rows.append((name, f"{e.get('status', '?')} ({secs})" + (f": {vals}" if vals else "")))
    return table(title, rows)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
