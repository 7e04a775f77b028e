"""Running jobs/evaluate.py's evaluation where the accelerator is: as one Ray task on a GPU worker
(the driver of `ray job submit` usually sits on a CPU-only head node), or in this process when no
Ray cluster is configured. Also the wandb logging of the finished report (driver side)."""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from system.config.eval_schema import EvaluateConfig
from system.config.load import redacted_dict
from system.data.storage import protocol
from system.eval.report import flat_metrics
from system.eval.suite import run_evaluation

log = logging.getLogger(__name__)


def wants_cluster(cfg: EvaluateConfig) -> bool:
    """Ray already up, an address configured, or RAY_ADDRESS set (`ray job submit`)."""
    import ray

    return ray.is_initialized() or bool(cfg.cluster.address or os.environ.get("RAY_ADDRESS"))


def evaluate(cfg: EvaluateConfig) -> dict:
    """The report dict; on a Ray cluster computed by one task with a GPU when the cluster has one."""
    if not wants_cluster(cfg):
        return run_evaluation(cfg)
    import ray

    from cluster.runtime import init_ray, resolve_use_gpu

    init_ray(cfg.cluster)
    use_gpu = resolve_use_gpu(cfg.cluster)
    task = ray.remote(run_evaluation).options(
        num_cpus=cfg.cluster.cpus_per_worker, num_gpus=cfg.cluster.gpus_per_worker if use_gpu else 0,
        max_retries=cfg.cluster.max_failures,
    )
    log.info("evaluating on a Ray worker (%s)", "GPU" if use_gpu else "CPU")
    return ray.get(task.remote(cfg))


def log_to_wandb(report: dict, cfg: EvaluateConfig, out: str) -> Any:
    """Log the report's metrics (offline unless configured); never fails the job. Returns the run dir."""
    if cfg.logging.wandb_mode == "disabled":
        return None
    wdir = out if protocol(out) == "file" else os.path.join(tempfile.gettempdir(), "wandb-eval")
    try:
        import wandb

        os.makedirs(wdir, exist_ok=True)
        run = wandb.init(
            project=cfg.logging.project, entity=cfg.logging.entity, name=cfg.run_name, job_type="eval",
            mode=cfg.logging.wandb_mode, dir=wdir, config=redacted_dict(cfg),
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        run.log(flat_metrics(report))
        run.summary.update({**flat_metrics(report), "inception": report["inception"]["label"]})
        run_dir = run.dir
        run.finish()
        return run_dir
    except Exception as e:  # noqa: BLE001 - logging must not lose a finished evaluation
        log.warning("wandb logging failed (%s: %s); the report file has everything", type(e).__name__, e)
        return None
