"""Rank-0 reporting: progress bar (step, loss, images/s), wandb (offline unless configured) and
the run's metric records (`<run>/metrics.jsonl`, rewritten at each checkpoint commit so it never
holds steps a resumed run has rolled back)."""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
import time
from typing import Any

from system.config import Experiment, redacted_dict

log = logging.getLogger(__name__)


def _in_ray_worker() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001
        return False


class Progress:
    """A local tqdm bar for runs outside Ray (tests, a single process); inside a Ray worker the
    driver draws the bar from rank 0's progress events (cluster/console.py)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool = True):
        self.bar: Any = None
        if enabled and not _in_ray_worker():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def show(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            text = f"loss={metrics.get('loss', float('nan')):.4f} img/s={metrics.get('images_per_s', 0.0):.1f}"
            self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def wandb_id(run_name: str) -> str:
    """A stable wandb run id for a run name (so a resubmitted run continues the same wandb run)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:64]


class RunLogger:
    """Rank 0 keeps the metric records of the run and forwards them to wandb and the progress bar;
    other ranks get a no-op logger."""

    def __init__(self, cfg: Experiment, store, *, start_step: int, enabled: bool):
        self.cfg, self.store, self.enabled = cfg, store, enabled
        self.records: list[dict] = []
        self.wandb: Any = None
        self.progress = Progress(cfg.train.max_steps, start_step, cfg.run_name, enabled and cfg.logging.progress)
        if not enabled:
            return
        self.records = [r for r in store.read_jsonl("metrics.jsonl") if int(r.get("step", 0)) <= start_step]
        if cfg.logging.wandb_mode != "disabled":
            self._init_wandb()

    def _init_wandb(self) -> None:
        cfg = self.cfg
        wdir = self.store.root if self.store.local else os.path.join(tempfile.gettempdir(), "wandb", cfg.run_name)
        os.makedirs(wdir, exist_ok=True)
        try:
            import wandb

            self.wandb = wandb.init(
                project=cfg.logging.project,
                entity=cfg.logging.entity,
                name=cfg.run_name,
                id=wandb_id(cfg.run_name),
                resume="allow",
                mode=cfg.logging.wandb_mode,
                dir=wdir,
                config=redacted_dict(cfg),
                settings=wandb.Settings(console="off", x_disable_stats=True),
            )
        except Exception as e:  # noqa: BLE001 - logging must not kill a training run
            log.warning("wandb.init failed (%s: %s); continuing without wandb", type(e).__name__, e)
            self.wandb = None

    def step(self) -> None:
        self.progress.update(1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        self.records.append(row)
        self.progress.show(step, metrics)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if not self.cfg.logging.progress or _in_ray_worker():  # the run's log file (workers: logs/rank_0.log)
            print(f"[{self.cfg.run_name}] step {step} " + " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())), flush=True)

    def flush(self) -> None:
        """Write metrics.jsonl (rank 0; called at checkpoint commits and at the end)."""
        if self.enabled:
            self.store.write_bytes("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records).encode())

    def curves(self, keys: list[str]) -> None:
        """Write `<run>/curves.png` (rank 0): one panel per metric of `keys` from the records so far."""
        if not self.enabled or not self.records:
            return
        from system.eval.curves import curves_png

        png = curves_png(self.records, keys, title=self.cfg.run_name)
        if png:
            self.store.write_bytes("curves.png", png)

    def summary(self, extra: dict[str, Any]) -> None:
        if not self.enabled:
            return
        last = self.records[-1] if self.records else {}
        data = {"run_name": self.cfg.run_name, "time": time.time(), "last": last, **extra}
        self.store.write_bytes("metrics.json", json.dumps(data, indent=1, sort_keys=True).encode())
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in extra.items() if isinstance(v, (int, float))})

    def close(self) -> None:
        self.progress.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
