"""Resumable multi-step pipelines (jobs/alitok_xl.py): a list of `Step`s, each done when its
marker file exists (the step's own last write: a run's result.json, a token index, a samples npz,
an evaluation report). `run_pipeline` skips the done steps and runs the rest in order, so a killed
job resubmitted continues at the step it was in, and that step continues where it stopped (a
training run from its last checkpoint, pre-tokenization and sampling from their finished
shards/parts). `<root>/pipeline.json` records each step's status, time and summary.

The step builders wrap the jobs' own drivers (train_pool, pretokenize_pool, sample_pool,
eval_pool); a pipeline is a list of them over one config.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from cluster.console import say, table
from system.config import (
    ARExperiment, EvaluateConfig, Experiment, LatentCacheConfig, PretokenizeConfig, SampleConfig, StorageConfig)
from system.config.pipelines import AliTokPipelineConfig, SemTokPipelineConfig
from system.data.storage import exists, join, read_json, write_bytes_atomic


@dataclass
class Step:
    name: str
    marker: str  # URL whose existence means the step is done (written last by the step)
    run: Callable[[], dict]  # does the step; returns a JSON-friendly summary
    describe: str = ""  # one line for the console: what the step makes and where


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
        summary = step.run()
        entry.update(status="done", seconds=round(time.time() - t0, 1), summary=summary)
        _write_state(url, state, storage)
    _write_state(url, state, storage)
    return state


def run_pipeline_job(cfg: AliTokPipelineConfig | SemTokPipelineConfig, make_steps: Callable[[str], list[Step]], keys: dict[str, Sequence[str]]) -> int:
    """A pipeline job's run (after its config checks): the steps of `make_steps(root)` under
    <cfg.storage_path>/<cfg.run_name> (each starts or joins Ray itself), the resolved config saved
    there, the final table of `keys`; a config error inside a step exits 2."""
    from system.config import exit_on_config_error, to_yaml

    root = f"{cfg.storage_path.rstrip('/')}/{cfg.run_name}"
    state = exit_on_config_error(lambda: run_pipeline(cfg.run_name, make_steps(root), root, cfg.storage, to_yaml(cfg)))
    print(state_table(f"[{cfg.run_name}] pipeline done: {root}", state, keys))
    return 0


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


# --------------------------------------------------------------------------- step builders
def tokenizer_step(name: str, exp: Experiment, keys: tuple[str, ...], title: str,
                   others: Optional[dict[str, str]] = None, describe: str = "") -> Step:
    """Train a tokenizer method (a Ray Train run); its report (val PSNR next to `others`' exports)
    and <run>/result.json, the marker."""
    from cluster.paths import run_url

    def run() -> dict:
        from cluster.training import train

        out = train(exp, title=title, extra={"step": name}, finished_ok=True)
        return {"step": out["step"], "export": out["export"], **{k: out["metrics"].get(k) for k in keys},
                **{f"val_psnr_{k}": v for k, v in (out.get("val_psnr_db") or {}).items()}}

    return Step(name, join(run_url(exp), "result.json"), run, describe)


def ar_step(exp: ARExperiment, keys: tuple[str, ...] = ("loss", "acc"), describe: str = "") -> Step:
    """Train an AR model on token shards (a Ray Train run); <run>/result.json is the marker."""
    from cluster.paths import run_url

    def run() -> dict:
        from cluster.results import write_run_result
        from cluster.training import resolve_job, train_or_finished

        result = train_or_finished(exp, resolve_job(exp))
        m = result.metrics
        write_run_result(result, exp.data.storage)
        say(table(f"[{exp.run_name}] AR done", [(k, m[k]) for k in keys if k in m] + [("export", result.export_url)]))
        return {"step": result.step, "export": result.export_url, **{k: m.get(k) for k in keys}}

    return Step("ar", join(run_url(exp), "result.json"), run, describe)


def pretokenize_step(cfg: PretokenizeConfig, describe: str = "") -> Step:
    """Image shards -> token shards on a map pool; the token index (written last) is the marker."""

    def run() -> dict:
        from cluster.pretokenize_pool import prepare, pretokenize, summary_rows
        from cluster.runtime import init_ray

        index, info, meta = prepare(cfg)
        init_ray(cfg.cluster)
        s = pretokenize(cfg, index, info, meta)
        say(table(f"pretokenize: done -> {cfg.out}", summary_rows(cfg, index, info, s)))
        return {"views": s["index"]["num_samples"], "bytes": s["bytes"], "out": cfg.out}

    return Step("pretokenize", join(cfg.out, "index.json"), run, describe)


def latents_step(cfg: LatentCacheConfig, describe: str = "") -> Step:
    """Image shards -> latent shards (the frozen VAE's latents of every view) on a map pool; the
    latent index (written last) is the marker."""

    def run() -> dict:
        from cluster.latent_pool import cache_latents, summary_rows

        s = cache_latents(cfg)
        say(table(f"latent cache: done -> {cfg.out}", summary_rows(cfg, s)))
        return {k: s[k] for k in ("views", "bytes", "bytes_per_view", "out")}

    return Step("latents", join(cfg.out, "index.json"), run, describe)


def sample_step(cfg: SampleConfig, describe: str = "") -> Step:
    """Sample from the AR export on an actor pool; samples.npz (merged last) is the marker."""

    def run() -> dict:
        from cluster.runtime import init_ray
        from cluster.sample_pool import run_sampling

        init_ray(cfg.cluster)
        s = run_sampling(cfg)
        say(table("sample: done", [(k, s[k]) for k in ("samples", "num_images", "images_per_s")] +
                  [("grids", ", ".join(s["grids"][:2]))]))
        return {k: s[k] for k in ("samples", "num_images", "images_per_s", "grids")}

    return Step("sample", join(cfg.out, "samples.npz"), run, describe)


def evaluate_step(cfg: EvaluateConfig, describe: str = "") -> Step:
    """Generation and reconstruction metrics; <out>/report.json is the marker."""

    def run() -> dict:
        from cluster.eval_pool import evaluate
        from system.eval.report import flat_metrics, format_table

        report = evaluate(cfg)
        write_bytes_atomic(join(cfg.out, "report.json"), json.dumps(report, indent=1).encode(), cfg.storage)
        print(format_table(report))
        return {k: v for k, v in flat_metrics(report).items() if isinstance(v, (int, float, str))}

    return Step("evaluate", join(cfg.out, "report.json"), run, describe)
