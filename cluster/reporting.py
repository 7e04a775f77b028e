"""Rank-0 reporting: progress bar (step, loss, images/s), wandb (offline unless configured) and
the run's metric records (`<run>/metrics.jsonl`, rewritten at each checkpoint commit so it never
holds steps a resumed run has rolled back).

wandb's run folder lives in the run (`<run>/wandb/`): for a local run wandb writes there; for a run
on object storage wandb writes to a local folder of rank 0's process (`<tempdir>/wandb-<run_name>-*`,
lost with that node or pod; removed after the last upload) which `sync_wandb_dir` uploads to
`<run>/wandb/` at each checkpoint commit (`RunLogger.flush`) and at the end (`RunLogger.close`).
`wandb sync <run>/wandb/offline-run-*` (after copying it down) publishes an offline run.

The run's logs (`<run>/logs/driver.log`, `<run>/logs/rank_<r>.log`, cluster/console.py) live the
same way: written in place for a local run; for a run on object storage written to a local file of
the process (a temp folder, starting from the stored log so a resumed or resubmitted run appends)
and uploaded whole by `sync_logs` when changed: at each checkpoint commit (every rank its own, the
driver when it sees the commit), at the end of the run and at exit. A pod deleted after the job
takes nothing with it but the lines since the last upload (all of them after a kill -9)."""
from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Optional

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


class RunLogFile:
    """A log of the run on object storage: the local file `path` this process writes, uploaded whole
    to `url` by `sync` when its size or mtime changed since the last upload."""

    def __init__(self, path: str, url: str, storage: StorageConfig | None, tmp_dir: str):
        self.path, self.url, self.storage, self.tmp_dir = path, url, storage, tmp_dir
        self._uploaded: Optional[tuple[int, int]] = None
        self.ended = False  # its run is over and its final upload failed: later attempts are quick ones

    def sync(self, quick: bool = False) -> bool:
        """Upload when changed; a failure is logged, never raised (False). `quick`: one attempt, no
        waiting out an outage (at interpreter exit)."""
        from system.data.storage import filesystem

        try:
            st = os.stat(self.path)
            if self._uploaded == (st.st_size, st.st_mtime_ns):
                return True
            storage = self.storage
            if quick:
                storage = dataclasses.replace(storage or StorageConfig(), retry_budget_s=0.0, max_attempts=1)
            fs, path = filesystem(self.url, storage)
            fs.put_file(self.path, path)
            self._uploaded = (st.st_size, st.st_mtime_ns)
            return True
        except Exception as e:  # noqa: BLE001 - logging must not kill a training run
            log.warning("uploading the log %s to %s failed (%s: %s)", self.path, self.url, type(e).__name__, e)
            return False


_LOGS: list[RunLogFile] = []  # this process's logs of runs on object storage
_at_exit: list = []  # the exit hook, once registered


def run_log(run_url: str, name: str, storage: StorageConfig | None = None) -> tuple[str, str]:
    """(local path to write, where the log lives) for the run's log `<run_url>/logs/<name>`. Local
    storage: that file itself. Object storage: a file in a new temp folder of this process, holding
    the stored log so far (appended to, not replaced, by a resumed or resubmitted run), uploaded by
    `sync_logs` (registered here; also at exit)."""
    from system.data.storage import exists, filesystem, join, protocol

    if protocol(run_url) == "file":
        folder = os.path.join(run_url.removeprefix("file://"), "logs")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        return path, path
    url = join(run_url, "logs", name)
    tmp = tempfile.mkdtemp(prefix=f"run-log-{os.path.splitext(name)[0]}-")
    path = os.path.join(tmp, name)
    try:
        if exists(url, storage):
            fs, remote = filesystem(url, storage)
            fs.get_file(remote, path)
    except Exception as e:  # noqa: BLE001 - a fresh log is better than none
        log.warning("reading the stored log %s failed (%s: %s); starting a new one", url, type(e).__name__, e)
    open(path, "ab").close()
    if not _at_exit:
        _at_exit.append(atexit.register(sync_logs, final=True, quick=True))
    _LOGS.append(RunLogFile(path, url, storage, tmp))
    return path, url


def discard_logs(run_url: str) -> None:
    """The run `run_url` did not start (refused): its logs this process writes are closed, and those
    on object storage that were never uploaded are dropped with their local folder."""
    prefix = run_url.rstrip("/") + "/"
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler) and (h.baseFilename.startswith(prefix.removeprefix("file://"))
                                                   or any(h.baseFilename == f.path for f in _LOGS if f.url.startswith(prefix))):
            root.removeHandler(h)
            h.close()
    for f in list(_LOGS):
        if f.url.startswith(prefix) and f._uploaded is None:
            _LOGS.remove(f)
            shutil.rmtree(f.tmp_dir, ignore_errors=True)


def sync_logs(final: bool = False, quick: bool = False, run_url: Optional[str] = None) -> bool:
    """Upload this process's run logs on object storage that changed (see `run_log`); `run_url`: only
    that run's. `final`: the process is done with them, and each uploaded one is dropped with its local
    folder; `quick`: one attempt, no waiting out a storage outage (at exit). False when an upload
    failed (logged)."""
    for stream in (sys.stdout, sys.stderr):  # a worker's output goes to its log through these
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    ok, prefix = True, run_url.rstrip("/") + "/" if run_url else ""
    for f in [f for f in _LOGS if f.url.startswith(prefix)]:
        done = f.sync(quick or f.ended)  # an ended run's storage that is gone must not hold up a later run
        ok = ok and done
        if final and done:
            _LOGS.remove(f)
            shutil.rmtree(f.tmp_dir, ignore_errors=True)
        elif final:
            f.ended = True
    return ok


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
        """Write metrics.jsonl and upload wandb's offline run (rank 0), and this rank's log (object
        storage); called at checkpoint commits."""
        if self.enabled:
            self.store.write_bytes("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records).encode())
            self.sync_wandb()
        sync_logs(run_url=self.store.run_url)  # every rank: its own log of this run (object storage)

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
        sync_logs(run_url=self.store.run_url)
