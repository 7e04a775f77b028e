"""Our checkpoint store on any fsspec URL (local folder or s3://), committed atomically.

Layout of a run (`<checkpoint.storage_path>/<run_name>/`):

    checkpoints/step_%08d/
        gen/ disc/          DeepSpeed files of each engine, written by every rank
        shared/state.json   step, world size, ZeRO stage, engines (rank 0)
        shared/ema_<module>.safetensors   EMA weights of each module that keeps one, when replicated (rank 0)
        rank_%05d/rng.pt reader.pt method.pt buffers.pt [ema_<module>.safetensors when ZeRO-3 partitioned]
        COMMITTED           marker object, written by rank 0 after a barrier, last

A checkpoint without its marker does not exist: `latest_complete` skips it, and the next
resume deletes it. Each rank writes into a local staging folder, then uploads its own files.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from safetensors.torch import load_file, save_file

from torch import nn

from system.config import StorageConfig
from system.data.storage import filesystem, join, protocol, storage_error
from system.train_utils import EMA, capture_rng_state, restore_rng_state

MARKER = "COMMITTED"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


def rank_dir(rank: int) -> str:
    return f"rank_{rank:05d}"


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    url: str


class CheckpointStore:
    """Checkpoints of one run under `<run_url>/checkpoints/`, plus small run-level files."""

    def __init__(self, run_url: str, storage: Optional[StorageConfig] = None):
        self.run_url = run_url.rstrip("/")
        self.storage = storage
        self.fs, self.root = filesystem(self.run_url, storage)
        self.local = protocol(self.run_url) == "file"

    # ------------------------------------------------------------------ paths
    def url(self, *parts: str) -> str:
        return join(self.run_url, *parts)

    def _path(self, *parts: str) -> str:
        out = self.root.rstrip("/")
        for p in parts:
            if p.strip("/"):
                out = f"{out}/{p.strip('/')}"
        return out

    def ckpt_url(self, step: int) -> str:
        return self.url("checkpoints", step_dir(step))

    # ------------------------------------------------------------------ small files
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write `<run>/rel` (local: via a temporary name and rename, so readers never see half a file)."""
        path = self._path(rel)
        try:
            if self.local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp-{os.getpid()}"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(path, data)
        except Exception as e:  # noqa: BLE001
            raise storage_error(self.url(rel), self.storage, e) from e

    def read_bytes(self, rel: str) -> Optional[bytes]:
        """Content of `<run>/rel`, or None when it does not exist."""
        try:
            return self.fs.cat_file(self._path(rel))
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001
            raise storage_error(self.url(rel), self.storage, e) from e

    def read_jsonl(self, rel: str) -> list[dict]:
        """Records of the JSON-lines file `<run>/rel` ([] when it does not exist)."""
        data = self.read_bytes(rel)
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()] if data else []

    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(self._path(rel))

    # ------------------------------------------------------------------ listing
    def steps(self) -> dict[int, bool]:
        """Every checkpoint folder's step -> whether it has its marker."""
        base = self._path("checkpoints")
        self.fs.invalidate_cache()
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)]
        except FileNotFoundError:
            return {}
        except Exception as e:  # noqa: BLE001
            raise storage_error(self.url("checkpoints"), self.storage, e) from e
        out = {}
        for n in names:
            m = _STEP_DIR.match(n)
            if m:
                out[int(m.group(1))] = self.fs.exists(f"{base}/{n}/{MARKER}")
        return out

    def latest_complete(self) -> Optional[CheckpointRef]:
        done = [s for s, ok in self.steps().items() if ok]
        return CheckpointRef(max(done), self.ckpt_url(max(done))) if done else None

    # ------------------------------------------------------------------ write / read a checkpoint
    def upload(self, local_dir: str, step: int) -> None:
        """Put every file under `local_dir` at the same relative path inside checkpoint `step`."""
        dest = self._path("checkpoints", step_dir(step))
        for root, _, files in os.walk(local_dir):
            for name in sorted(files):
                src = os.path.join(root, name)
                rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
                try:
                    if self.local:
                        os.makedirs(os.path.dirname(f"{dest}/{rel}"), exist_ok=True)
                        shutil.move(src, f"{dest}/{rel}")
                    else:
                        self.fs.put_file(src, f"{dest}/{rel}")
                except Exception as e:  # noqa: BLE001
                    raise storage_error(f"{self.ckpt_url(step)}/{rel}", self.storage, e) from e

    def download(self, step: int, local_dir: str, parts: list[str]) -> str:
        """Copy the folders `parts` of checkpoint `step` into `local_dir` (missing parts are skipped)."""
        base = self._path("checkpoints", step_dir(step))
        os.makedirs(local_dir, exist_ok=True)
        for part in parts:
            src = f"{base}/{part}"
            if not self.fs.exists(src):
                continue
            for path in self.fs.find(src):
                rel = path[len(base) :].lstrip("/")
                target = os.path.join(local_dir, rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                try:
                    self.fs.get_file(path, target)
                except Exception as e:  # noqa: BLE001
                    raise storage_error(f"{self.ckpt_url(step)}/{rel}", self.storage, e) from e
        return local_dir

    def commit(self, step: int, info: Optional[dict] = None) -> None:
        """Write the marker (last): checkpoint `step` now exists."""
        data = json.dumps({"step": step, "time": time.time(), **(info or {})}).encode()
        self.write_bytes(f"checkpoints/{step_dir(step)}/{MARKER}", data)

    def delete(self, step: int) -> None:
        path = self._path("checkpoints", step_dir(step))
        try:
            marker = f"{path}/{MARKER}"
            if self.fs.exists(marker):  # marker first: a half-deleted checkpoint is never "complete"
                self.fs.rm(marker)
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def prune(self, keep_last: int) -> list[int]:
        """Keep the newest `keep_last` complete checkpoints; delete older ones and unmarked leftovers
        older than the newest complete one. Returns the deleted steps."""
        steps = self.steps()
        done = sorted(s for s, ok in steps.items() if ok)
        if not done:
            return []
        keep = set(done[-max(keep_last, 1) :])
        doomed = [s for s in steps if s not in keep and s < done[-1]]
        for s in doomed:
            self.delete(s)
        return sorted(doomed)

    def remove_incomplete(self, after: int = -1) -> list[int]:
        """Delete unmarked checkpoints newer than `after` (interrupted writes, before resuming)."""
        doomed = [s for s, ok in self.steps().items() if not ok and s > after]
        for s in doomed:
            self.delete(s)
        return sorted(doomed)


def latest_complete(run_url: str, storage: Optional[StorageConfig] = None) -> Optional[CheckpointRef]:
    """The newest checkpoint of the run at `run_url` that has its marker (None if there is none)."""
    return CheckpointStore(run_url, storage).latest_complete()


# ---------------------------------------------------------------------------- training state
def _torch_save(obj: Any, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(obj, path)


def _torch_load(path: str) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class TrainState:
    """What a worker checkpoints besides the engines (all optional except `step`)."""

    step: int
    emas: dict[str, EMA] = field(default_factory=dict)  # module name -> EMA of its (local) parameters
    ema_partitioned: bool = False
    reader: Any = None  # the batch source: state_dict() / load_state_dict()
    method: Any = None  # the Method: state_dict() / load_state_dict() (per-rank state)
    # module name -> module: their persistent buffers are saved per rank (DeepSpeed keeps rank 0's
    # only, which would hand every rank rank 0's running statistics, e.g. LeCam's EMAs, on resume)
    modules: dict[str, nn.Module] = field(default_factory=dict)


def module_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent buffers of `module` by state-dict name (CPU copies)."""
    out = {}
    for prefix, m in module.named_modules():
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = b.detach().cpu().clone()
    return out


@torch.no_grad()
def load_module_buffers(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    mine = dict(module.named_buffers())
    missing = sorted(set(state) - set(mine))
    if missing:
        raise RuntimeError(f"checkpoint has buffers the module lacks: {missing[:5]}")
    for k, v in state.items():
        mine[k].copy_(v.to(mine[k].device))


def stage_root(run_name: str, step: int, rank: int) -> str:
    return os.path.join(tempfile.gettempdir(), "ckpt_stage", f"{run_name}-{os.getpid()}", step_dir(step), rank_dir(rank))


def commit_checkpoint(
    store: CheckpointStore,
    strategy,
    engines: Mapping[str, Any],
    state: TrainState,
    *,
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
    run_name: str,
    keep_last: int,
    info: Optional[dict] = None,
) -> CheckpointRef:
    """Collective: save this rank's part of checkpoint `state.step`, upload it, and (rank 0) write
    the marker after every rank has uploaded, then prune old checkpoints."""
    step = state.step
    local = stage_root(run_name, step, rank)
    shutil.rmtree(local, ignore_errors=True)
    os.makedirs(local)
    for tag, engine in engines.items():
        strategy.save(engine, local, tag)
    for extra in os.listdir(local):  # DeepSpeed's helper scripts (zero_to_fp32.py ...) are not ours
        if os.path.isfile(os.path.join(local, extra)):
            os.remove(os.path.join(local, extra))
    mine = os.path.join(local, rank_dir(rank))
    _torch_save(capture_rng_state(), os.path.join(mine, "rng.pt"))
    if state.reader is not None:
        _torch_save(state.reader.state_dict(), os.path.join(mine, "reader.pt"))
    if state.method is not None:
        _torch_save(state.method.state_dict(), os.path.join(mine, "method.pt"))
    if state.modules:
        _torch_save({n: module_buffers(m) for n, m in state.modules.items()}, os.path.join(mine, "buffers.pt"))
    for name, ema in state.emas.items():
        if state.ema_partitioned:
            save_file(ema.state_dict(), os.path.join(mine, f"ema_{name}.safetensors"))
        elif rank == 0:
            os.makedirs(os.path.join(local, "shared"), exist_ok=True)
            save_file(ema.state_dict(), os.path.join(local, "shared", f"ema_{name}.safetensors"))
    if rank == 0:
        meta = {"step": step, "world_size": world_size, "engines": sorted(engines), **(info or {})}
        os.makedirs(os.path.join(local, "shared"), exist_ok=True)
        with open(os.path.join(local, "shared", "state.json"), "w") as f:
            json.dump(meta, f)
    store.upload(local, step)
    shutil.rmtree(os.path.dirname(local), ignore_errors=True)
    barrier()
    if rank == 0:
        store.commit(step, {"world_size": world_size})
        store.prune(keep_last)
    return CheckpointRef(step, store.ckpt_url(step))


def restore_checkpoint(
    store: CheckpointStore,
    ref: CheckpointRef,
    strategy,
    engines: Mapping[str, Any],
    state: TrainState,
    *,
    rank: int,
    world_size: int,
    run_name: str,
) -> TrainState:
    """Collective: load checkpoint `ref` into the engines, EMA, reader, method and RNG states."""
    local = stage_root(run_name, ref.step, rank) + "-load"
    shutil.rmtree(local, ignore_errors=True)
    store.download(ref.step, local, [*engines, "shared", rank_dir(rank)])
    with open(os.path.join(local, "shared", "state.json")) as f:
        meta = json.load(f)
    if meta["world_size"] != world_size:
        raise RuntimeError(
            f"checkpoint {ref.url} was written by {meta['world_size']} workers but this run has {world_size}; "
            "resume with cluster.num_workers the same (ZeRO partitions and data positions are per rank)"
        )
    missing = sorted(set(engines) - set(meta["engines"]))
    if missing:
        raise RuntimeError(f"checkpoint {ref.url} has no state for engine(s) {missing}; it holds {meta['engines']}")
    for tag, engine in engines.items():
        strategy.load(engine, local, tag)
    mine = os.path.join(local, rank_dir(rank))
    for name, ema in state.emas.items():
        path = os.path.join(mine if state.ema_partitioned else os.path.join(local, "shared"), f"ema_{name}.safetensors")
        if os.path.exists(path):
            ema.load_state_dict(load_file(path))
    if state.modules and os.path.exists(os.path.join(mine, "buffers.pt")):
        buffers = _torch_load(os.path.join(mine, "buffers.pt"))
        for name, module in state.modules.items():
            load_module_buffers(module, buffers.get(name, {}))
    if state.reader is not None:
        path = os.path.join(mine, "reader.pt")
        if not os.path.exists(path):
            raise RuntimeError(f"checkpoint {ref.url} has no data reader state for rank {rank}")
        state.reader.load_state_dict(_torch_load(path))
    if state.method is not None and os.path.exists(os.path.join(mine, "method.pt")):
        state.method.load_state_dict(_torch_load(os.path.join(mine, "method.pt")))
    restore_rng_state(_torch_load(os.path.join(mine, "rng.pt")))
    shutil.rmtree(os.path.dirname(local), ignore_errors=True)
    state.step = int(meta["step"])
    return state

