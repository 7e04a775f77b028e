"""Rank-0 reporting: progress bar (step, loss, images/s), wandb (offline unless configured) and
the run's metric records (`<run>/metrics.jsonl`, rewritten at each checkpoint commit so it never
holds steps a resumed run has rolled back).

wandb's run folder lives in the run (`<run>/wandb/`): for a local run wandb writes there; for a run
on object storage wandb writes to a local folder of rank 0's process (`<tempdir>/wandb-<run_name>-*`,
lost with that node or pod; removed after the last upload) which `sync_wandb_dir` uploads to
`<run>/wandb/` at each checkpoint commit (`RunLogger.flush`) and at the end (`RunLogger.close`).
`wandb sync <run>/wandb/offline-run-*` (after copying it down) publishes an offline run."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any

from system.config import Experiment, StorageConfig, redacted_dict

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


def sync_wandb_dir(local_dir: str, run_url: str, storage: StorageConfig | None = None,
                   uploaded: dict[str, tuple[int, int]] | None = None) -> int:
    """Upload wandb's folder `local_dir` (the `wandb/` folder holding `offline-run-*`, `run-*`) to
    `<run_url>/wandb/`: every file (symlinks skipped) new or changed since `uploaded` (relative path
    -> (size, mtime_ns), updated in place). Returns the number of files uploaded."""
    from system.data.storage import filesystem, join

    uploaded = {} if uploaded is None else uploaded
    if not os.path.isdir(local_dir):
        return 0
    fs, root = filesystem(join(run_url, "wandb"), storage)
    n = 0
    for folder, dirs, files in os.walk(local_dir):
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(folder, d)))
        for name in sorted(files):
            src = os.path.join(folder, name)
            if os.path.islink(src):
                continue
            st = os.stat(src)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            if uploaded.get(rel) == (st.st_size, st.st_mtime_ns):
                continue
            fs.put_file(src, f"{root.rstrip('/')}/{rel}")
            uploaded[rel] = (st.st_size, st.st_mtime_ns)
            n += 1
    return n


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
        self.wandb_dir: str | None = None  # wandb's local folder when it must be uploaded to <run>/wandb
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._tmp_dir: str | None = None  # wandb's local folder of a run on object storage (removed at close)
        self.progress = Progress(cfg.train.max_steps, start_step, cfg.run_name, enabled and cfg.logging.progress)
        if not enabled:
            return
        self.records = [r for r in store.read_jsonl("metrics.jsonl") if int(r.get("step", 0)) <= start_step]
        if cfg.logging.wandb_mode != "disabled":
            self._init_wandb()

    def _init_wandb(self) -> None:
        cfg = self.cfg
        # object storage: a folder of this process only (another run of the same name on this node
        # must not be uploaded into this run)
        wdir = self.store.root if self.store.local else tempfile.mkdtemp(prefix=f"wandb-{wandb_id(cfg.run_name)}-")
        os.makedirs(wdir, exist_ok=True)
        self._tmp_dir = None if self.store.local else wdir
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
            if not self.store.local and cfg.logging.wandb_mode == "offline":
                self.wandb_dir = os.path.join(wdir, "wandb")
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
        """Write metrics.jsonl and upload wandb's offline run (rank 0; called at checkpoint commits)."""
        if self.enabled:
            self.store.write_bytes("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records).encode())
            self.sync_wandb()

    def sync_wandb(self) -> bool:
        """Upload wandb's offline run folder to `<run>/wandb/` (object storage; files changed since the
        last upload). A failure is logged, not raised (metrics.jsonl is the run's record): False."""
        if not self.enabled or self.wandb_dir is None:
            return True
        try:
            sync_wandb_dir(self.wandb_dir, self.store.run_url, self.store.storage, self._uploaded)
            return True
        except Exception as e:  # noqa: BLE001 - logging must not kill a training run
            log.warning("uploading wandb's run folder %s to %s/wandb failed (%s: %s)", self.wandb_dir, self.store.run_url,
                        type(e).__name__, e)
            return False

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
        if self.sync_wandb() and self._tmp_dir is not None:  # the finished run, complete: the local copy can go
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = self.wandb_dir = None
