"""A job's front door: its config from the command line (`--help`, exit 2 on a bad key or value,
the method's checks against its data before any Ray resource is touched) and its run (a finished
run says so and exits 0; a config error found while starting exits 2 in one line)."""
from __future__ import annotations

from typing import Any, Callable, Optional

from cluster.console import say
from system.config import ConfigError, Experiment


class RunFinished(Exception):
    """The run already reached `train.max_steps` and has its export: nothing to do (not an error)."""


def job_config(schema: type, argv: list[str], defaults: list[str], check: Optional[Callable[[Any], None]] = None) -> Any:
    """A training job's config from its command line: parse it (`--help`; exit 2 on a bad key or
    value), build the embedded photo set when `data.embedded`, then the method's checks against its
    data (`cluster.training.resolve_job`) and `check(cfg)`: all exit 2, before any Ray resource."""
    from cluster.training import resolve_job
    from system.config import cli_config, exit_on_config_error
    from system.config.load import dry_run_requested
    from system.data.embedded import ensure_embedded_data

    cfg = cli_config(schema, argv, defaults)
    exit_on_config_error(lambda: ensure_embedded_data(cfg.data))
    if dry_run_requested(argv):
        dry_run(cfg)
    exit_on_config_error(lambda: resolve_job(cfg))
    if check is not None:
        exit_on_config_error(lambda: check(cfg))
    return cfg


def dry_run(exp: Experiment, steps: Optional[list] = None) -> None:
    """`--dry-run` of a job: plan its step(s) (default: training `exp`), print the table, write
    `<run>/plan.json`, exit 0 without starting anything (a config or wiring error exits 2)."""
    from cluster.paths import resolve_paths, run_url
    from system.config import exit_on_config_error
    from system.pipelines.dry_run import run_dry
    from system.pipelines.steps import TrainStep

    exp = resolve_paths(exp)
    steps = steps or [TrainStep(name=exp.run_name, exp=exp)]
    exit_on_config_error(lambda: run_dry(f"[{exp.run_name}]", steps, run_url(exp), exp.data.storage))
    raise SystemExit(0)


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
