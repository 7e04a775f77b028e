"""Our checkpoint store on any fsspec URL (local folder or s3://), committed atomically.

Layout of a run (`<checkpoint.storage_path>/<run_name>/`):

    checkpoints/step_%08d/
        gen/ disc/          DeepSpeed files of each engine, written by every rank
        shared/state.json   step, world size, ZeRO stage, engines (rank 0)
        shared/ema_<module>.safetensors   EMA weights of each module that keeps one, when replicated (rank 0)
        rank_%05d/rng.pt reader.pt method.pt buffers.pt [ema_<module>.safetensors when ZeRO-3 partitioned]
        COMMITTED           marker object, written by rank 0 after every rank uploaded, last
        BAD                 marker object: a resume found a damaged file (cluster/restore.py)

A checkpoint without its marker does not exist: `latest_complete` skips it, and the next
resume deletes it. Each rank writes into a local staging folder, then uploads its own files.

The marker is JSON: {"step", "time", "world_size", "files": {path in the checkpoint: {"size",
"sha256"}}}. Every rank takes the size and SHA-256 of each file while writing it
(cluster/integrity.py) and sends them to rank 0, which writes the marker once all ranks have
uploaded. A resume checks every file it fetches against it (cluster/restore.py); a checkpoint
found damaged is marked `BAD` and never chosen again (`latest_complete`), and when every committed
checkpoint is bad, `latest_complete` raises `NoIntactCheckpoint` rather than answer "start from
scratch". Markers of checkpoints written before checksums were recorded have no "files".
Retention (`prune`) keeps the newest `checkpoint.keep_last` checkpoints not marked bad and the
one the run resumed from (the last one verified), so a fallback always has somewhere to go.

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

from torch import nn

from cluster.integrity import Digest, NoIntactCheckpoint, hash_file, save_bytes, save_tensors, save_torch
from system.config import StorageConfig
from system.data.storage import StorageError, endpoint_of, filesystem, join, protocol, storage_error
from system.train_utils import EMA, capture_rng_state

MARKER = "COMMITTED"
BAD = "BAD"  # marker of a committed checkpoint that a resume found damaged
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

    def _has(self, step: int, name: str) -> bool:
        """Whether checkpoint `step` has the object `name` (an error checking it is raised, not False)."""
        try:
            self._io(f"{self.ckpt_url(step)}/{name}", self.fs.info, self._path("checkpoints", step_dir(step), name))
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
                out[int(m.group(1))] = self._has(int(m.group(1)), MARKER)
        return out

    def latest_complete(self) -> Optional[CheckpointRef]:
        """The newest committed checkpoint not marked bad; None when the run has no committed one
        (`NoIntactCheckpoint` when it has some and a resume found every one of them damaged)."""
        done = sorted((s for s, ok in self.steps().items() if ok), reverse=True)
        for s in done:
            if not self.is_bad(s):
                return CheckpointRef(s, self.ckpt_url(s))
        if not done:
            return None
        found = "; ".join(f"step {s}: {self.bad_reason(s)}" for s in done)
        raise NoIntactCheckpoint(f"run {self.run_url} has no intact checkpoint left: a resume found every committed one "
                                 f"damaged ({found}). Put back a good copy of one of them (and delete its {BAD} marker) "
                                 "to continue, or start a new run (another run_name)")

    # ------------------------------------------------------------------ checksums and damage
    def marker(self, step: int) -> Optional[dict]:
        """The content of checkpoint `step`'s commit marker (None when it has none)."""
        data = self.read_bytes(f"checkpoints/{step_dir(step)}/{MARKER}")
        return json.loads(data) if data is not None else None

    def is_bad(self, step: int) -> bool:
        return self._has(step, BAD)

    def mark_bad(self, step: int, damaged: dict[str, str]) -> None:
        """Mark committed checkpoint `step` bad (never chosen again): `damaged` maps files to what is wrong."""
        self.write_bytes(f"checkpoints/{step_dir(step)}/{BAD}",
                         json.dumps({"step": step, "time": time.time(), "files": damaged}).encode())

    def bad_reason(self, step: int) -> str:
        data = self.read_bytes(f"checkpoints/{step_dir(step)}/{BAD}")
        files = json.loads(data).get("files", {}) if data else {}
        return ", ".join(f"{f} {why}" for f, why in sorted(files.items())) or "marked bad"

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
        """Write the marker (last): checkpoint `step` now exists. A `BAD` marker left by a damaged
        checkpoint of the same step (the run fell back and trained past it again) goes after it."""
        data = json.dumps({"step": step, "time": time.time(), **(info or {})}).encode()
        self.write_bytes(f"checkpoints/{step_dir(step)}/{MARKER}", data)
        bad = self._path("checkpoints", step_dir(step), BAD)
        with contextlib.suppress(FileNotFoundError):
            self._io(f"{self.ckpt_url(step)}/{BAD}", self.fs.rm, bad)

    def delete(self, step: int) -> None:
        path, url = self._path("checkpoints", step_dir(step)), self.ckpt_url(step)
        try:
            marker = f"{path}/{MARKER}"
            if self._io(url, self.fs.exists, marker):  # marker first: a half-deleted checkpoint is never "complete"
                self._io(url, self.fs.rm, marker)
            self._io(url, self.fs.rm, path, recursive=True)
        except FileNotFoundError:
            pass

    def prune(self, keep_last: int, verified: Optional[int] = None) -> list[int]:
        """Keep the newest `keep_last` complete checkpoints not marked bad and the `verified` one (the
        last one a resume checked); delete older ones, bad ones and unmarked leftovers older than the
        newest complete one. Returns the deleted steps."""
        steps = self.steps()
        done = sorted(s for s, ok in steps.items() if ok)
        if not done:
            return []
        good = [s for s in done if not self.is_bad(s)]
        keep = set(good[-max(keep_last, 1) :]) | ({verified} if verified is not None else set())
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
                      world_size: int, info: Optional[dict]) -> dict[str, Digest]:
    """Write this rank's part of checkpoint `state.step` into the staging folder `local`; returns
    the size and checksum of every file in it by path relative to `local`, taken while writing."""
    step = state.step
    written: dict[str, Digest] = {}
    for tag, engine in engines.items():
        written.update(strategy.save(engine, local, tag) or {})
    for extra in os.listdir(local):  # DeepSpeed's helper scripts (zero_to_fp32.py ...) are not ours
        if os.path.isfile(os.path.join(local, extra)):
            os.remove(os.path.join(local, extra))
    mine = os.path.join(local, rank_dir(rank))

    def save(path: str, write: Callable[[str], Digest]) -> None:
        written[path] = write(path)

    save(os.path.join(mine, "rng.pt"), lambda p: save_torch(capture_rng_state(), p))
    if state.reader is not None:
        save(os.path.join(mine, "reader.pt"), lambda p: save_torch(state.reader.state_dict(), p))
    if state.method is not None:
        save(os.path.join(mine, "method.pt"), lambda p: save_torch(state.method.state_dict(), p))
    if state.modules:
        save(os.path.join(mine, "buffers.pt"), lambda p: save_torch({n: module_buffers(m) for n, m in state.modules.items()}, p))
    for name, ema in state.emas.items():
        if state.ema_partitioned:
            save(os.path.join(mine, f"ema_{name}.safetensors"), lambda p: save_tensors(ema.state_dict(), p))
        elif rank == 0:
            save(os.path.join(local, "shared", f"ema_{name}.safetensors"), lambda p: save_tensors(ema.state_dict(), p))
    if rank == 0:
        meta = {"step": step, "world_size": world_size, "engines": sorted(engines), "emas": sorted(state.emas),
                "ema_partitioned": state.ema_partitioned, **(info or {})}
        save(os.path.join(local, "shared", "state.json"), lambda p: save_bytes(json.dumps(meta).encode(), p))
    written = {os.path.abspath(p): d for p, d in written.items()}
    out = {}
    for root, _, names in os.walk(local):
        for n in names:
            path = os.path.abspath(os.path.join(root, n))
            # a file no writer reported (a strategy that does not hash, e.g. a test's) is read once here
            out[os.path.relpath(path, local).replace(os.sep, "/")] = written.get(path) or hash_file(path)
    return out


def _gather(obj: Any, rank: int, world_size: int) -> Optional[list]:
    """Collective: every rank's `obj` on rank 0 (None on the others)."""
    if not (dist.is_initialized() and world_size > 1):
        return [obj]
    out = [None] * world_size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def commit_checkpoint(
    store: CheckpointStore,
    strategy,
    engines: Mapping[str, Any],
    state: TrainState,
    *,
    rank: int,
    world_size: int,
    run_name: str,
    keep_last: int,
    verified: Optional[int] = None,
    info: Optional[dict] = None,
) -> CheckpointRef:
    """Collective: save this rank's part of checkpoint `state.step` and upload it; rank 0 gathers
    every rank's file sizes and checksums once all have uploaded, writes them into the marker
    (last), then prunes old checkpoints (never the `verified` one: the step this run resumed from)."""
    step = state.step
    with staging(run_name, step, rank, "save") as local:
        files = _stage_checkpoint(local, strategy, engines, state, rank=rank, world_size=world_size, info=info)
        store.upload(local, step)
    parts = _gather(files, rank, world_size)
    if rank == 0:
        manifest = {rel: d.to_json() for part in parts for rel, d in part.items()}
        store.commit(step, {"world_size": world_size, "files": dict(sorted(manifest.items()))})
        store.prune(keep_last, verified)
    return CheckpointRef(step, store.ckpt_url(step))
