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

Resume fetches per rank only what that rank loads: `shared/`, its own `rank_%05d/` and, of each
engine folder, the files the strategy fetches (`DeepSpeedStrategy.load_files`: this rank's ZeRO
partition and the small model metadata, never the other ranks' partitions). A checkpoint written
at another world size (a retry on a smaller or larger cluster) is re-partitioned: each engine from
the old shards overlapping this rank's new partition, a ZeRO-3 partitioned EMA from every old
rank's slice; every rank continues the data reader from rank 0's state (the reader's state must
not depend on the world size), and ranks the old run did not have take rank 0's method state and
buffers and an RNG stream forked from rank 0's. `state.json` records the world size.

Every storage access goes through `CheckpointStore._io` on the fsspec filesystem of
`system.data.storage.filesystem` (local folders too), so storage.py's retry policy applies to
upload, download, listing, markers and deletes alike.

"No checkpoints" must mean a fresh run, never "could not look": listing raises `StorageError`
naming the URL when the endpoint cannot be reached, access is denied, or the storage root is
missing. The storage root is the bucket for object storage (a new run's prefix has no objects
yet, which is fine) and the folder holding the run folder for local storage (a new run's folder
may be absent; a missing parent is a typo or a volume not mounted on this node).

Staging (`$CKPT_STAGE_DIR`, default `<tempdir>/ckpt_stage`) holds one folder per save or load,
`<host>_<pid>_<random>_<run>-<step>-<rank>-<save|load>`, removed however that save or load ends;
folders of processes of this machine that died (killed mid-save) are removed at the next one.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from torch import nn

from system.config import StorageConfig
from system.data.storage import StorageError, endpoint_of, filesystem, join, protocol, storage_error
from system.train_utils import EMA, capture_rng_state, restore_rng_state, seed_everything

MARKER = "COMMITTED"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
STAGE_ENV = "CKPT_STAGE_DIR"  # staging root; default <tempdir>/ckpt_stage
_STAGE_NAME = re.compile(r"^(?P<host>[^_]+)_(?P<pid>\d+)_")  # <host>_<pid>_<random>_<run>-<step>-<rank>-<kind>
_OLD_STAGE_NAME = re.compile(r"^.+-(?P<pid>\d+)$")  # the former per-process folder <run_name>-<pid>


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

    def _root_path(self) -> str:
        """The storage root inside `fs`: the folder holding the run folder (local) or the bucket."""
        path = self.root.rstrip("/")
        return (path.rsplit("/", 1)[0] or "/") if self.local else path.split("/", 1)[0]

    def root_url(self) -> str:
        """URL of the storage root, which must exist for "no checkpoints" to mean a fresh run."""
        return self._root_path() if self.local else f"{protocol(self.run_url)}://{self._root_path()}"

    # ------------------------------------------------------------------ storage access
    def _io(self, url: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args)` on storage (a method of `self.fs`), its errors named by `url` (FileNotFoundError
        passes through). The one place where storage is touched: a retry policy of storage.py hooks here."""
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001
            raise storage_error(url, self.storage, e) from e

    # ------------------------------------------------------------------ small files
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write `<run>/rel` (local: via a temporary name and rename, so readers never see half a file)."""
        path, url = self._path(rel), self.url(rel)
        if self.local:
            tmp = f"{path}.tmp-{os.getpid()}"
            self._io(url, self.fs.makedirs, os.path.dirname(path), exist_ok=True)
            self._io(url, self.fs.pipe_file, tmp, data)
            self._io(url, self.fs.mv, tmp, path)
        else:
            self._io(url, self.fs.pipe_file, path, data)

    def read_bytes(self, rel: str) -> Optional[bytes]:
        """Content of `<run>/rel`, or None when it does not exist."""
        try:
            return self._io(self.url(rel), self.fs.cat_file, self._path(rel))
        except FileNotFoundError:
            return None

    def read_jsonl(self, rel: str) -> list[dict]:
        """Records of the JSON-lines file `<run>/rel` ([] when it does not exist)."""
        data = self.read_bytes(rel)
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()] if data else []

    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache()
        return self._io(self.url(rel), self.fs.exists, self._path(rel))

    # ------------------------------------------------------------------ listing
    def check_root(self) -> None:
        """Raise `StorageError` naming the storage root when it is missing, not a folder or unreachable."""
        url = self.root_url()
        try:
            info = self._io(url, self.fs.info, self._root_path())
        except FileNotFoundError:
            where = endpoint_of(self.run_url, self.storage)
            raise StorageError(f"storage root {url} of run {self.run_url} does not exist ({where}); create it, or "
                               "fix the storage path (a run that cannot see its checkpoints would restart from step 0)"
                               ) from None
        if info.get("type") != "directory":
            raise StorageError(f"storage root {url} of run {self.run_url} is not a folder")

    def _committed(self, step_path: str, step: int) -> bool:
        """Whether the checkpoint folder `step_path` has its marker (an error checking it is raised, not False)."""
        try:
            self._io(f"{self.ckpt_url(step)}/{MARKER}", self.fs.info, f"{step_path}/{MARKER}")
            return True
        except FileNotFoundError:
            return False

    def steps(self) -> dict[int, bool]:
        """Every checkpoint folder's step -> whether it has its marker; {} only for a run with no
        checkpoint folder under an existing storage root (`StorageError` naming the URL otherwise)."""
        base = self._path("checkpoints")
        self.fs.invalidate_cache()
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self._io(self.url("checkpoints"), self.fs.ls, base, detail=False)]
        except FileNotFoundError:
            self.check_root()  # a new run, or a bucket / volume that is not there?
            return {}
        out = {}
        for n in names:
            m = _STEP_DIR.match(n)
            if m:
                out[int(m.group(1))] = self._committed(f"{base}/{n}", int(m.group(1)))
        return out

    def latest_complete(self) -> Optional[CheckpointRef]:
        done = [s for s, ok in self.steps().items() if ok]
        return CheckpointRef(max(done), self.ckpt_url(max(done))) if done else None

    # ------------------------------------------------------------------ write / read a checkpoint
    def upload(self, local_dir: str, step: int) -> None:
        """Put every file under `local_dir` at the same relative path inside checkpoint `step`
        (local storage: moved, not copied)."""
        dest = self._path("checkpoints", step_dir(step))
        for root, _, files in os.walk(local_dir):
            for name in sorted(files):
                src = os.path.join(root, name)
                rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
                url = f"{self.ckpt_url(step)}/{rel}"
                if self.local:
                    self._io(url, self.fs.makedirs, os.path.dirname(f"{dest}/{rel}"), exist_ok=True)
                    self._io(url, self.fs.mv, src, f"{dest}/{rel}")
                else:
                    self._io(url, self.fs.put_file, src, f"{dest}/{rel}")

    def list_files(self, step: int, part: str) -> list[str]:
        """Paths (relative to checkpoint `step`) of the files under its folder `part` ([] if absent)."""
        base = self._path("checkpoints", step_dir(step))
        try:
            found = self._io(f"{self.ckpt_url(step)}/{part}", self.fs.find, f"{base}/{part}")
        except FileNotFoundError:
            return []
        return sorted(p[len(base):].lstrip("/") for p in found)

    def fetch(self, step: int, rel: str, target: str) -> str:
        """Copy the file `rel` of checkpoint `step` to the local path `target`."""
        os.makedirs(os.path.dirname(target), exist_ok=True)
        self._io(f"{self.ckpt_url(step)}/{rel}", self.fs.get_file, f"{self._path('checkpoints', step_dir(step))}/{rel}", target)
        return target

    def download(self, step: int, local_dir: str, parts: list[str], keep: Optional[Callable[[str], bool]] = None) -> str:
        """Copy the folders `parts` of checkpoint `step` into `local_dir` (missing parts are skipped),
        only the files whose relative path `keep` accepts when given."""
        os.makedirs(local_dir, exist_ok=True)
        for part in parts:
            for rel in self.list_files(step, part):
                if keep is None or keep(rel):
                    self.fetch(step, rel, os.path.join(local_dir, *rel.split("/")))
        return local_dir

    def commit(self, step: int, info: Optional[dict] = None) -> None:
        """Write the marker (last): checkpoint `step` now exists."""
        data = json.dumps({"step": step, "time": time.time(), **(info or {})}).encode()
        self.write_bytes(f"checkpoints/{step_dir(step)}/{MARKER}", data)

    def delete(self, step: int) -> None:
        path, url = self._path("checkpoints", step_dir(step)), self.ckpt_url(step)
        try:
            marker = f"{path}/{MARKER}"
            if self._io(url, self.fs.exists, marker):  # marker first: a half-deleted checkpoint is never "complete"
                self._io(url, self.fs.rm, marker)
            self._io(url, self.fs.rm, path, recursive=True)
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


# ---------------------------------------------------------------------------- local staging
def staging_base() -> str:
    """The staging root shared by the processes of this machine: $CKPT_STAGE_DIR, else <tempdir>/ckpt_stage."""
    return os.environ.get(STAGE_ENV) or os.path.join(tempfile.gettempdir(), "ckpt_stage")


def _safe(text: str) -> str:
    """`text` as a file-name part without '_' (the separator of staging names) or '/'."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text) or "-"


def staging_dir(run_name: str, step: int, rank: int, kind: str) -> str:
    """A new empty staging folder of this process for one save or load (`kind`), named after this host and pid."""
    base = staging_base()
    os.makedirs(base, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{_safe(socket.gethostname())}_{os.getpid()}_",
                            suffix=f"_{_safe(run_name)}-{step_dir(step)}-{rank_dir(rank)}-{kind}", dir=base)


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's live process
        return True
    return True


def _owner_pid(name: str) -> Optional[int]:
    """The pid of the process of this machine that staged into folder `name` (None: not ours to judge)."""
    m = _STAGE_NAME.match(name)
    if m:
        return int(m["pid"]) if m["host"] == _safe(socket.gethostname()) else None
    m = _OLD_STAGE_NAME.match(name)
    return int(m["pid"]) if m else None


def remove_stale_staging(base: Optional[str] = None) -> list[str]:
    """Delete staging folders of processes of this machine that are gone (killed while saving or
    loading, so their cleanup never ran). Returns the removed folder names."""
    base = base or staging_base()
    try:
        names = os.listdir(base)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        path = os.path.join(base, name)
        pid = _owner_pid(name)
        if pid is None or _pid_alive(pid) or os.path.islink(path) or not os.path.isdir(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(name)
    return removed


@contextlib.contextmanager
def staging(run_name: str, step: int, rank: int, kind: str) -> Iterator[str]:
    """A fresh staging folder for one save or load, removed however the block ends (stale folders
    of dead processes are removed first)."""
    remove_stale_staging()
    path = staging_dir(run_name, step, rank, kind)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _stage_checkpoint(local: str, strategy, engines: Mapping[str, Any], state: TrainState, *, rank: int,
                      world_size: int, info: Optional[dict]) -> None:
    """Write this rank's part of checkpoint `state.step` into the staging folder `local`."""
    step = state.step
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
        meta = {"step": step, "world_size": world_size, "engines": sorted(engines), "emas": sorted(state.emas),
                "ema_partitioned": state.ema_partitioned, **(info or {})}
        os.makedirs(os.path.join(local, "shared"), exist_ok=True)
        with open(os.path.join(local, "shared", "state.json"), "w") as f:
            json.dump(meta, f)


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
    with staging(run_name, step, rank, "save") as local:
        _stage_checkpoint(local, strategy, engines, state, rank=rank, world_size=world_size, info=info)
        store.upload(local, step)
    barrier()
    if rank == 0:
        store.commit(step, {"world_size": world_size})
        store.prune(keep_last)
    return CheckpointRef(step, store.ckpt_url(step))


def _read_meta(local: str, ref: CheckpointRef, engines: Mapping[str, Any]) -> dict:
    with open(os.path.join(local, "shared", "state.json")) as f:
        meta = json.load(f)
    missing = sorted(set(engines) - set(meta["engines"]))
    if missing:
        raise RuntimeError(f"checkpoint {ref.url} has no state for engine(s) {missing}; it holds {meta['engines']}")
    return meta


class _StoreFiles:
    """The files of engine folder `tag` of a checkpoint, fetched into `local` when first asked for
    and deleted once released (`cluster.repartition.CheckpointFiles`)."""

    def __init__(self, store: CheckpointStore, step: int, tag: str, local: str):
        self.store, self.step, self.tag, self.local = store, step, tag, local
        self.names = [rel.split("/", 1)[1] for rel in store.list_files(step, tag)]
        self.where = f"{store.ckpt_url(step)}/{tag}"

    def path(self, name: str) -> str:
        target = os.path.join(self.local, self.tag, *name.split("/"))
        return target if os.path.exists(target) else self.store.fetch(self.step, f"{self.tag}/{name}", target)

    def release(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.local, self.tag, *name.split("/")))


def _fork_rng(rank: int) -> None:
    """A stream of its own for a rank the checkpoint had no RNG state for (after restoring rank 0's)."""
    seed_everything(int(torch.randint(0, 2**62, (1,)).item()) + 7919 * (rank + 1))


def _broadcast_ema(store: CheckpointStore, ref: CheckpointRef, local: str, name: str, ema: EMA, *, rank: int,
                   world_size: int) -> None:
    """Collective: a replicated EMA, fetched by rank 0 only and broadcast (not read from storage by
    every rank: it is as large as the module)."""
    rel = f"shared/ema_{name}.safetensors"
    present = None
    if rank == 0:
        try:
            ema.load_state_dict(load_file(store.fetch(ref.step, rel, os.path.join(local, *rel.split("/")))))
            present = True
        except FileNotFoundError:
            present = False
    if dist.is_initialized() and world_size > 1:
        box = [present]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            for key in sorted(ema.shadow):
                dist.broadcast(ema.shadow[key], src=0)


def _load_rank_state(local: str, ref: CheckpointRef, meta: dict, strategy, engines: Mapping[str, Any],
                     state: TrainState, *, rank: int, world_size: int, store: CheckpointStore) -> None:
    """Collective: EMA, buffers, reader, method and RNG state of this rank from the checkpoint staged
    in `local`. At another world size: rank 0's reader state, rank `rank`'s other state if the old run
    had it, else rank 0's (and a forked RNG stream); a partitioned EMA is re-partitioned from the old
    ranks' slices that overlap this rank's."""
    saved_world = int(meta["world_size"])
    same = saved_world == world_size
    src = rank if rank < saved_world else 0
    mine = os.path.join(local, rank_dir(src))
    saved_partitioned = bool(meta.get("ema_partitioned", state.ema_partitioned))
    if state.emas and saved_partitioned != state.ema_partitioned:
        raise RuntimeError(f"checkpoint {ref.url} keeps its EMA {'partitioned (ZeRO-3)' if saved_partitioned else 'whole'} "
                           f"and this run {'partitioned' if state.ema_partitioned else 'whole'}: resume with the ZeRO "
                           f"stage it was written with (deepspeed.zero_stage={meta.get('zero_stage', '?')})")
    for name, ema in sorted(state.emas.items()):
        if not state.ema_partitioned:
            _broadcast_ema(store, ref, local, name, ema, rank=rank, world_size=world_size)
        elif same:
            path = os.path.join(mine, f"ema_{name}.safetensors")
            if os.path.exists(path):
                ema.load_state_dict(load_file(path))
        else:
            if name not in engines:
                raise RuntimeError(f"checkpoint {ref.url}: EMA of {name!r} has no engine to re-partition it with")

            def part(k: int, name: str = name) -> dict:
                rel = f"{rank_dir(k)}/ema_{name}.safetensors"
                return load_file(store.fetch(ref.step, rel, os.path.join(local, "ema", rel.replace("/", "_"))))

            ema.load_state_dict(strategy.reshard_local(engines[name], saved_world, part))
    if state.modules and os.path.exists(os.path.join(mine, "buffers.pt")):
        buffers = _torch_load(os.path.join(mine, "buffers.pt"))
        for name, module in state.modules.items():
            load_module_buffers(module, buffers.get(name, {}))
    if state.reader is not None:
        path = os.path.join(local, rank_dir(rank if same else 0), "reader.pt")
        if not os.path.exists(path):
            raise RuntimeError(f"checkpoint {ref.url} has no data reader state for rank {rank if same else 0}")
        state.reader.load_state_dict(_torch_load(path))
    if state.method is not None and os.path.exists(os.path.join(mine, "method.pt")):
        state.method.load_state_dict(_torch_load(os.path.join(mine, "method.pt")))
    restore_rng_state(_torch_load(os.path.join(mine, "rng.pt")))
    if src != rank:
        _fork_rng(rank)


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
    """Collective: load checkpoint `ref` into the engines, EMA, reader, method and RNG states,
    fetching only what this rank loads; a checkpoint of another world size is re-partitioned."""
    with staging(run_name, ref.step, rank, "load") as local:
        # a whole EMA is fetched by rank 0 alone and broadcast (`_broadcast_ema`)
        store.download(ref.step, local, ["shared"], keep=lambda rel: not rel.rsplit("/", 1)[-1].startswith("ema_"))
        meta = _read_meta(local, ref, engines)
        saved = int(meta["world_size"])
        same = saved == world_size
        if not same and not hasattr(strategy, "load_files"):
            raise RuntimeError(f"checkpoint {ref.url} was written by {saved} workers but this run has {world_size}, "
                               f"and {type(strategy).__name__} cannot re-partition engine state")
        if same:
            store.download(ref.step, local, [rank_dir(rank)])
        else:
            if rank == 0:
                print(f"[checkpoint] re-partitioning {ref.url} from {saved} to {world_size} workers", flush=True)
            src = rank if rank < saved else 0  # whose per-rank state this rank continues
            store.download(ref.step, local, [rank_dir(src)],
                           keep=lambda rel: not (state.ema_partitioned and rel.rsplit("/", 1)[-1].startswith("ema_")))
            if src != 0 and state.reader is not None:  # the data position is rank 0's
                store.fetch(ref.step, f"{rank_dir(0)}/reader.pt", os.path.join(local, rank_dir(0), "reader.pt"))
        for tag, engine in engines.items():
            files = _StoreFiles(store, ref.step, tag, local)
            if hasattr(strategy, "load_files"):  # fetches only what this rank reads
                strategy.load_files(engine, files, same_world=same)
            else:
                for name in files.names:
                    files.path(name)
                strategy.load(engine, local, tag)
        _load_rank_state(local, ref, meta, strategy, engines, state, rank=rank, world_size=world_size, store=store)
    state.step = int(meta["step"])
    return state
