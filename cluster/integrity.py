"""Checkpoints that verify themselves: every file's size and SHA-256, taken while the file is
written, listed in the commit marker, and checked when a resume fetches the file.

Writing: `save_torch`, `save_tensors` and `save_bytes` write a file through `HashingWriter`, which
hashes the bytes on their way to the disk (no second read); each returns the file's `Digest`.
DeepSpeed's own files are written the same way (`cluster.engine`: its checkpoint engine's `save`).
The ranks' digests are gathered into the marker that rank 0 writes last (`cluster.checkpoint`).

Reading: `check` compares a fetched file with its digest and raises `DamagedCheckpoint` naming the
file (truncated, grown, or the same size with other bytes). `agree` is the collective after every
rank fetched what it reads: a failure on any rank is raised on every rank, before any state is
loaded, so all ranks fall back together.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from safetensors.torch import save as safetensors_bytes

CHUNK = 8 << 20  # bytes hashed per read when checking a fetched file


@dataclass(frozen=True)
class Digest:
    """Size and SHA-256 of one file, as the marker lists it."""

    size: int
    sha256: str

    def to_json(self) -> dict:
        return {"size": self.size, "sha256": self.sha256}

    @classmethod
    def from_json(cls, d: dict) -> "Digest":
        return cls(int(d["size"]), str(d["sha256"]))


class HashingWriter:
    """A binary file opened for writing that hashes and counts what goes through `write`."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._f = open(path, "wb")
        self._h = hashlib.sha256()
        self._size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._f.write(view)
        self._h.update(view)
        self._size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._f.flush()

    def digest(self) -> Digest:
        return Digest(self._size, self._h.hexdigest())

    def __enter__(self) -> "HashingWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def _write(path: str, fill: Callable[[HashingWriter], Any]) -> Digest:
    with HashingWriter(path) as f:
        fill(f)
        return f.digest()


def save_torch(obj: Any, path: str, zipfile: bool = True) -> Digest:
    """`torch.save(obj, path)`, hashed while written."""
    return _write(path, lambda f: torch.save(obj, f, _use_new_zipfile_serialization=zipfile))


def save_tensors(tensors: dict[str, torch.Tensor], path: str) -> Digest:
    """A safetensors file of `tensors`, hashed while written (serialized in memory first: the
    library writes files only by name)."""
    return _write(path, lambda f: f.write(safetensors_bytes(tensors)))


def save_bytes(data: bytes, path: str) -> Digest:
    return _write(path, lambda f: f.write(data))


def hash_file(path: str) -> Digest:
    """The digest of a file on disk (for a fetched file, or one a writer did not report)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return Digest(size, h.hexdigest())


class DamagedCheckpoint(RuntimeError):
    """A file of a committed checkpoint is missing or differs from what was written."""

    def __init__(self, url: str, file: str, reason: str):
        super().__init__(f"checkpoint {url} is damaged: {file} {reason}")
        self.url, self.file, self.reason = url, file, reason

    def __reduce__(self):  # pickles with its fields (exceptions pickle their message only)
        return type(self), (self.url, self.file, self.reason)


class NoIntactCheckpoint(RuntimeError):
    """Every committed checkpoint of a run is marked bad: nothing to resume, and starting over
    would silently drop the run's training."""


def check(path: str, want: Digest, url: str, file: str) -> None:
    """Raise `DamagedCheckpoint` when the local copy `path` of checkpoint file `file` is not `want`."""
    got = hash_file(path)
    if got.size != want.size:
        what = "truncated" if got.size < want.size else "longer than written"
        raise DamagedCheckpoint(url, file, f"has {got.size} bytes, {want.size} were written ({what})")
    if got.sha256 != want.sha256:
        raise DamagedCheckpoint(url, file, f"has other bytes than were written (SHA-256 {got.sha256[:12]}..., "
                                           f"written {want.sha256[:12]}...)")


def agree(failure: Optional[BaseException], rank: int, world_size: int,
          on_damage: Callable[[list[tuple[int, str, str]]], None]) -> None:
    """Collective: returns when no rank failed. Otherwise raises on every rank: `DamagedCheckpoint`
    when some rank found a damaged file (after `on_damage([(rank, file, reason), ...])` on rank 0),
    else the failing rank's own error there and a `RuntimeError` naming that rank elsewhere."""
    mine = None
    if failure is not None:
        d = failure if isinstance(failure, DamagedCheckpoint) else None
        mine = (d.url, d.file, d.reason) if d is not None else None, f"{type(failure).__name__}: {failure}"
    reports = [mine]
    if dist.is_initialized() and world_size > 1:
        reports = [None] * world_size
        dist.all_gather_object(reports, mine)
    failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
    if not failed:
        return
    damaged = [(r, rep[0]) for r, rep in failed if rep[0] is not None]
    if damaged:
        if rank == 0:
            on_damage([(r, file, reason) for r, (_, file, reason) in damaged])
        url, file, reason = damaged[0][1]
        raise DamagedCheckpoint(url, file, reason)
    if failure is not None:
        raise failure
    r, (_, text) = failed[0]
    raise RuntimeError(f"rank {r} could not read the checkpoint: {text}")
