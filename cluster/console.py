"""What a user sees while a training job runs: start-up lines, ONE progress bar (step, loss, img/s,
ETA) drawn by the driver, one line per checkpoint, and a final table. Everything else (worker
output, Ray's and DeepSpeed's messages, warnings, wandb) goes to the run's log files
(`<run>/logs/driver.log`, `<run>/logs/rank_<r>.log` for local storage).

Rank 0 sends small events through a `ProgressBoard` actor (fire-and-forget); the driver polls it
while Ray Train's `fit()` runs in a thread.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from typing import Any, Callable, Iterator, Optional

import ray

log = logging.getLogger("tokenizer_ar")


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
    log.info(msg)
    print(msg, file=sys.stderr, flush=True)


_SHARED_LOG: list[Optional[str]] = []  # set while a driver runs several runs at once: their one log file


def setup_driver_logging(run_dir: Optional[str], verbose: bool = False) -> Optional[str]:
    """Send every logger (ours, Ray's, DeepSpeed's, py.warnings) to `<run_dir>/logs/driver.log`
    (console only with `verbose`); returns the log file path (None when the run is not local).
    Inside `shared_driver_log` the driver's one log stays as it is (runs started side by side)."""
    if _SHARED_LOG:
        return _SHARED_LOG[-1]
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.INFO)
    path = None
    if run_dir:
        os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
        path = os.path.join(run_dir, "logs", "driver.log")
        fh = logging.FileHandler(path)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
    if verbose:
        root.addHandler(logging.StreamHandler(sys.stderr))
    logging.captureWarnings(True)
    for name in ("ray", "ray.train", "ray.data", "deepspeed", "DeepSpeed", "wandb"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
    return path


@contextlib.contextmanager
def shared_driver_log(run_dir: Optional[str], verbose: bool = False) -> Iterator[Optional[str]]:
    """One driver log (`<run_dir>/logs/driver.log`) for several runs started side by side in this
    process (cluster/multi_run.py): their own `setup_driver_logging` calls keep it."""
    path = setup_driver_logging(run_dir, verbose)
    _SHARED_LOG.append(path)
    try:
        yield path
    finally:
        _SHARED_LOG.pop()


def redirect_worker_output(run_dir: Optional[str], rank: int) -> None:
    """A worker's stdout/stderr (file descriptors: C++ and Python alike) -> `<run>/logs/rank_<r>.log`."""
    if not run_dir:
        return
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    fd = os.open(os.path.join(run_dir, "logs", f"rank_{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class ConsoleProgress:
    """The driver's progress bar fed by a `ProgressBoard`; prints checkpoint and resume lines."""

    def __init__(self, board: Any, run_name: str, total: int, enabled: bool = True):
        self.board, self.run_name, self.total, self.enabled = board, run_name, total, enabled
        self.bar: Any = None

    def _bar(self, initial: int) -> Any:
        if self.bar is None and self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=initial, desc=self.run_name, unit="step", dynamic_ncols=True,
                            file=sys.stderr, smoothing=0.1)
        return self.bar

    def _line(self, msg: str) -> None:
        log.info(msg)
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
        elif kind == "checkpoint":
            self._line(f"[{self.run_name}] checkpoint step {e['step']}: {e['url']}" +
                       (f"  (loss {e['loss']:.4f})" if isinstance(e.get("loss"), float) else ""))

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


def run_with_progress(fit: Callable[[], Any], progress: ConsoleProgress, every_s: float = 0.5) -> Any:
    """`fit()` in a thread while the driver polls the board; returns fit's result (re-raises its error)."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fit()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    t.start()
    while t.is_alive():
        t.join(every_s)
        progress.poll()
    progress.close()
    if "error" in box:
        raise box["error"]
    return box.get("result")


def table(title: str, rows: list[tuple[str, Any]]) -> str:
    """A two-column text table: `title`, then `key  value` lines (floats with 4 significant digits)."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join([title, *(f"  {k.ljust(width)}  {fmt(v)}" for k, v in rows)])
