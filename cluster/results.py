"""A finished training run's outputs for people and for the steps after it: the method's report
as a table (its metrics and validation, the run's paths) and `<run>/result.json`, written last: the
run's "done" marker for pipelines."""
from __future__ import annotations

import json
from typing import Any, Optional

from cluster.console import table
from system.config import Experiment
from system.data.storage import exists, read_bytes, write_bytes_atomic


def val_history(run: str, storage: Any) -> dict[str, float]:
    """The last value of every validation metric (`val*/...`) in `<run>/metrics.jsonl` (all
    sessions of the run: the untrained baseline `val_start/*` is logged by the first)."""
    url = f"{run.rstrip('/')}/metrics.jsonl"
    out: dict[str, float] = {}
    if not exists(url, storage):
        return out
    for line in read_bytes(url, storage).decode().splitlines():
        row = json.loads(line) if line.strip() else {}
        out.update({k: v for k, v in row.items() if k.startswith("val") and "/" in k})
    return out


def write_run_result(result: Any, storage: Any, extra: Optional[dict] = None) -> dict:
    """`<run>/result.json` (`result`: cluster.training.RunResult): where the run, its checkpoint and
    export are, its last metrics, and `extra`; returns that summary."""
    summary = {**(extra or {}), "run": result.run_url, "step": result.step, "checkpoint": result.checkpoint_url,
               "export": result.export_url, "metrics": result.metrics}
    write_bytes_atomic(f"{result.run_url}/result.json", json.dumps(summary, indent=1, default=str).encode(), storage)
    return summary


def report_run(exp: Experiment, result: Any, title: str, extra: Optional[dict] = None) -> dict:
    """The end of a training run: the method's report (`Method.report`: its metrics and validation)
    and the run's paths as a table on the console, and `<run>/result.json` with the report's keys
    and `extra`; returns the summary written there."""
    from system.methods import registry

    storage = exp.data.storage
    method = registry.for_config(exp.method).method
    run = result.run_url
    rep = method.report(exp.method, result.metrics, val_history(run, storage), result.export_url,
                        lambda url: val_history(url, storage))
    rows = rep.rows + [("checkpoint", result.checkpoint_url), ("export", result.export_url),
                       ("sample grid", f"{run}/samples/step_{result.step:08d}.png"), ("curves", f"{run}/curves.png"),
                       ("metrics", f"{run}/metrics.jsonl"), ("logs", f"{run}/logs/")]
    summary = write_run_result(result, storage, {**(extra or {}), **rep.summary})
    print(table(title, rows))
    return summary
