"""Where a training run lives: `<checkpoint.storage_path>/<run_name>` (a local folder or an object
store prefix), its local folder when there is one, and the checks on it before Ray starts."""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import replace
from typing import Iterator, Optional

from system.config import ConfigError, Experiment
from system.data.storage import join, protocol


def run_url(exp: Experiment) -> str:
    return join(exp.checkpoint.storage_path, exp.run_name)


def local_run_dir(exp: Experiment) -> Optional[str]:
    """The run's folder when its storage is local (None for object storage)."""
    sp = exp.checkpoint.storage_path
    return os.path.join(sp.removeprefix("file://"), exp.run_name) if protocol(sp) == "file" else None


def resolve_paths(exp: Experiment) -> Experiment:
    """A copy of `exp` whose local storage path is absolute (workers may run in another folder)."""
    sp = exp.checkpoint.storage_path
    if protocol(sp) == "file" and not sp.startswith("file://"):
        exp = replace(exp, checkpoint=replace(exp.checkpoint, storage_path=os.path.abspath(os.path.expanduser(sp))))
    return exp


def check_writable(exp: Experiment) -> None:
    """A local `checkpoint.storage_path` must be a folder this process can write (before Ray starts)."""
    run_dir = local_run_dir(exp)
    if run_dir is None:
        return
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write-probe-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"config key 'checkpoint.storage_path' = {exp.checkpoint.storage_path!r}: cannot write the run "
                          f"folder {run_dir} ({e.strerror or e}); choose a writable folder or s3://bucket/prefix") from None


def _outermost_missing(path: str) -> Optional[str]:
    """The outermost folder of `path` (itself included) that does not exist yet; None when it exists."""
    if os.path.exists(path):
        return None
    top = path
    while os.path.dirname(top) != top and not os.path.exists(os.path.dirname(top)):
        top = os.path.dirname(top)
    return top


@contextlib.contextmanager
def nothing_left_if_refused(exp: Experiment, unless: tuple = ()) -> Iterator[None]:
    """Around a run's start (its checks, the run folder, Ray, the driver's log): an error raised
    inside (config, resources, storage) leaves no trace of a run that did not exist before: the
    local folders made for it are removed, and a driver log on object storage that was never
    uploaded is dropped (`cluster.reporting.discard_logs`). Exceptions of the types `unless` are no
    refusal (they pass untouched)."""
    from cluster.reporting import discard_logs

    run_dir = local_run_dir(exp)
    made = _outermost_missing(run_dir) if run_dir is not None else None
    try:
        yield
    except Exception as e:
        if isinstance(e, unless):
            raise
        discard_logs(run_url(exp))
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
