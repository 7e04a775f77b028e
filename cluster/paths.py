"""Where a training run lives: `<checkpoint.storage_path>/<run_name>` (a local folder or an object
store prefix), its local folder when there is one, and the checks on it before Ray starts."""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional

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
