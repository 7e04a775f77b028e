"""What a user sees while a training job runs: start-up lines, ONE progress bar (step, loss, img/s,
ETA) drawn by the driver, one line per checkpoint, and a final table. Everything else (worker
output, Ray's and DeepSpeed's messages, Ray's error reports such as "A worker died ...", warnings,
wandb) goes to the run's log files, `<run>/logs/driver.log` and `<run>/logs/rank_<r>.log`, which
live in the run's storage: written in place for a local run, uploaded from a local file for a run
on object storage (cluster/reporting.py `run_log`, `sync_logs`: at each checkpoint and at exit),
so a KubeRay user reads them after the pods are gone. With `logging.verbose` the console shows
all of it instead (worker output through Ray, no rank logs); every line once either way.

Rank 0 sends small events through a `ProgressBoard` actor (fire-and-forget); the driver polls it
while Ray Train's `fit()` runs in a thread.
"""
from __future__ import annotations

import builtins
import contextlib
import functools
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator, Optional

import ray

from cluster.reporting import run_log, sync_logs

log = logging.getLogger("tokenizer_ar")
_SAID = {"said": True}  # a record of a line `say` has printed on the console already


class _NotSaid(logging.Filter):
    """The verbose console handler: lines `say` printed are not printed again."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "said", False)


class ProgressBoard:
    """A Ray actor (num_cpus=0) holding the events rank 0 pushes; the driver drains them."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def push(self, event: dict) -> None:
        self.events.append(event)

    def drain(self) -> list[dict]:
        out, self.events = self.events, []
        return out


def say(msg: str) -> None:
    """One console line from the driver (also in the driver log)."""
    log.info(msg, extra=_SAID)
    print(msg, file=sys.stderr, flush=True)


_SHARED_LOG: list[Optional[str]] = []  # set while a driver runs several runs at once: their one log file


def setup_driver_logging(run_url: Optional[str], verbose: bool = False, storage: Any = None) -> Optional[str]:
    """Send every logger (ours, Ray's, DeepSpeed's, py.warnings) and Ray's error reports to
    `<run_url>/logs/driver.log` (a local file uploaded there for object storage, `storage` its
    credentials; console too with `verbose`); returns where that log lives (None without a run).
    Inside `shared_driver_log` the driver's one log stays as it is (runs started side by side)."""
    if _SHARED_LOG:
        return _SHARED_LOG[-1]
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        if isinstance(h, logging.FileHandler):
            h.close()
    # an earlier run's logs of this process: complete, before a new one is read (one attempt each:
    # an earlier run's storage that is gone must not hold up this run; a failed one stays for the next)
    sync_logs(final=True, quick=True)
    root.setLevel(logging.INFO)
    where = None
    if run_url:
        path, where = run_log(run_url, "driver.log", storage)
        fh = logging.FileHandler(path)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
    if verbose:
        sh = logging.StreamHandler(sys.stderr)
        sh.addFilter(_NotSaid())
        root.addHandler(sh)
    logging.captureWarnings(True)
    for name in ("ray", "ray.train", "ray.data", "deepspeed", "DeepSpeed", "wandb"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
    route_ray_errors(to_log=not verbose)
    return where


def route_ray_errors(to_log: bool) -> None:
    """Ray's driver prints the errors the cluster pushes to it ("A worker died or was killed ...")
    straight to stdout, whatever `log_to_driver` says (`ray._private.worker.listen_error_messages`
    calls the module's `print_to_stdstream`). `to_log`: they go to the logger `ray.errors` (the
    driver log) instead; else Ray's own printing again."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:  # a Ray without this module prints as it likes
        return
    current = ray_worker.print_to_stdstream
    original = getattr(current, "__wrapped__", current)
    if not to_log:
        ray_worker.print_to_stdstream = original
        return

    @functools.wraps(original)
    def to_driver_log(data: dict, *args: Any, **kwargs: Any) -> None:
        for line in data.get("lines", []):
            logging.getLogger("ray.errors").warning("%s", line)

    ray_worker.print_to_stdstream = to_driver_log


@contextlib.contextmanager
def shared_driver_log(run_url: Optional[str], verbose: bool = False, storage: Any = None) -> Iterator[Optional[str]]:
    """One driver log (`<run_url>/logs/driver.log`) for several runs started side by side in this
    process (cluster/multi_run.py): their own `setup_driver_logging` calls keep it."""
    path = setup_driver_logging(run_url, verbose, storage)
    _SHARED_LOG.append(path)
    try:
        yield path
    finally:
        _SHARED_LOG.pop()


def redirect_worker_output(run_url: Optional[str], rank: int, storage: Any = None) -> None:
    """A worker's stdout/stderr (file descriptors: C++ and Python alike) -> `<run>/logs/rank_<r>.log`
    (a local file uploaded there for object storage, see `cluster.reporting.run_log`)."""
    if not run_url:
        return
    path, _ = run_log(run_url, f"rank_{rank}.log", storage)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def unpatch_print() -> None:
    """Ray Train's workers replace `print` with one that logs each line through the root logger
    (to stderr) and, as Ray wraps sys.stdout, also prints it: every line twice, on the console or in
    the rank log. The plain `print` again: each line once (logging records still go to stderr)."""
    try:
        from ray.train.v2._internal.logging.patch_print import _original_print
    except ImportError:  # a Ray Train without the patch
        return
    builtins.print = _original_print


@contextlib.contextmanager
def worker_output(run_url: Optional[str], rank: int, storage: Any = None, verbose: bool = False) -> Iterator[None]:
    """Around a training worker's work: each line of its output once; without `verbose` into
    `<run>/logs/rank_<r>.log` (on object storage uploaded at each commit by `RunLogger`, and here
    at the end, also after an error)."""
    unpatch_print()
    if not verbose:
        redirect_worker_output(run_url, rank, storage)
    try:
        yield
    except BaseException:
        if not verbose:  # why this rank stopped, in its own log (Ray reports it to the driver too)
            traceback.print_exc()
        raise
    finally:
        sync_logs(final=True)


class ConsoleProgress:
    """The driver's progress bar fed by a `ProgressBoard`; prints checkpoint and resume lines."""

    def __init__(self, board: Any, run_name: str, total: int, enabled: bool = True):
        self.board, self.run_name, self.total, self.enabled = board, run_name, total, enabled
        self.bar: Any = None
        self.refused: Optional[str] = None  # a rank's error that a restart would meet again (cluster/train_pool.py)

    def _bar(self, initial: int) -> Any:
        if self.bar is None and self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=initial, desc=self.run_name, unit="step", dynamic_ncols=True,
                            file=sys.stderr, smoothing=0.1)
        return self.bar

    def _line(self, msg: str) -> None:
        log.info(msg, extra=_SAID)
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def handle(self, e: dict) -> None:
        kind = e.get("kind")
        if kind == "start":
            if e.get("resumed_from"):
                self._line(f"[{self.run_name}] resumed from {e['resumed_from']} (step {e['step']})")
            self._bar(e["step"])
            if self.bar is not None:  # a restarted pool starts again from its checkpoint
                self.bar.n = e["step"]
                self.bar.refresh()
        elif kind == "step":
            bar = self._bar(0)
            if bar is not None:
                bar.n = e["step"]
                bar.set_postfix_str(f"loss={e.get('loss', float('nan')):.4f} img/s={e.get('images_per_s', 0.0):.1f}",
                                    refresh=True)
        elif kind == "refused":
            if self.refused is None:
                self.refused = str(e["message"])
                log.info("rank %s stopped the run: %s", e.get("rank"), self.refused)
        elif kind == "checkpoint":
            self._line(f"[{self.run_name}] checkpoint step {e['step']}: {e['url']}" +
                       (f"  (loss {e['loss']:.4f})" if isinstance(e.get("loss"), float) else ""))
            sync_logs()  # the driver's log reaches the run's storage with each checkpoint

    def poll(self) -> None:
        try:
            events = ray.get(self.board.drain.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - the bar must never break a run
            return
        for e in events:
            self.handle(e)

    def close(self) -> None:
        self.poll()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_with_progress(fit: Callable[[], Any], progress: ConsoleProgress, every_s: float = 0.5,
                      refused_grace_s: float = 60.0) -> Any:
    """`fit()` in a thread while the driver polls the board; returns fit's result (re-raises its error).
    When a rank refused the run (`progress.refused`: an error every restart would meet again), a
    `ConfigError` with its message once fit ends, or after `refused_grace_s` if other ranks are
    still running (waiting for the refused one in a collective)."""
    from system.config import ConfigError

    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fit()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    t.start()
    refused_at = None
    while t.is_alive():
        t.join(every_s)
        progress.poll()
        if progress.refused is not None:
            refused_at = refused_at or time.monotonic()
            if time.monotonic() - refused_at > refused_grace_s:
                break
    progress.close()
    sync_logs()
    if progress.refused is not None:
        raise ConfigError(progress.refused)
    if "error" in box:
        raise box["error"]
    return box.get("result")


def table(title: str, rows: list[tuple[str, Any]]) -> str:
    """A two-column text table: `title`, then `key  value` lines (floats with 4 significant digits)."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join([title, *(f"  {k.ljust(width)}  {fmt(v)}" for k, v in rows)])
