"""Tar I/O of the shard readers (system/data/stream.py): samples [lo, hi) of a shard as one ranged
read, using the per-sample byte offsets in the shard's marker (`<shard>.done.json`, written by
shards.write_tar; without them a range that does not start the shard is read by streaming the tar
from its start), parsed by a fast in-memory USTAR parser (`tarfile` for other kinds of tar).
Unreadable data (shard missing, tar truncated or corrupt) comes back as None entries; storage
failures (unreachable endpoint, credentials) raise `StorageError`."""
from __future__ import annotations

import errno
import io
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

from system.config import StorageConfig
from system.data.shards import iter_tar_samples, read_marker
from system.data.storage import StorageError, filesystem, join, storage_error

log = logging.getLogger(__name__)


@dataclass
class TarShards:
    """The shards a reader reads: `shards` (name, samples in the shard) under `url`; `complete`
    says whether a sample's fields are whole (the codec's). Also, per reader and per worker
    process: the shards found missing, the per-sample byte offsets by shard."""

    url: str
    storage: StorageConfig
    shards: list[tuple[str, int]]
    complete: Callable[[dict[str, bytes]], bool]
    missing: set = field(default_factory=set, repr=False)
    offsets: dict = field(default_factory=dict, repr=False)


_WARNED: set[str] = set()
_LOCK = threading.Lock()


def warn_once(tag: str, msg: str, *args) -> None:
    """Log a warning once per process for `tag`."""
    with _LOCK:
        if tag in _WARNED:
            return
        _WARNED.add(tag)
    log.warning(msg, *args)


def _offsets(files: TarShards, shard: int) -> Optional[np.ndarray]:
    """Byte offset of each sample's first tar member (+ the end of the last), from the shard's
    marker; None when the marker lacks them (shards written before they were recorded)."""
    name, count = files.shards[shard]
    url = join(files.url, name)
    if url not in files.offsets:
        try:
            marker = read_marker(files.url, name, files.storage) or {}
        except (FileNotFoundError, ValueError):
            marker = {}
        offs = marker.get("offsets")
        ok = isinstance(offs, list) and len(offs) == count + 1 and all(a < b for a, b in zip(offs, offs[1:]))
        files.offsets[url] = np.asarray(offs, dtype=np.int64) if ok else None
    return files.offsets[url]


class _UseTarfile(Exception):
    """The tar uses a feature the fast parser leaves to `tarfile` (pax/GNU headers, links...)."""


def _tar_samples(data: bytes, complete: Callable[[dict[str, bytes]], bool]) -> Iterator[tuple[str, Optional[dict]]]:
    """`shards.iter_tar_samples` for a tar (or a run of whole members of one) in memory: the same
    (key, fields) protocol, ending with one (key, None) where the data is truncated or corrupt, but
    several times faster on the plain USTAR files shards.write_tar writes. Raises `_UseTarfile`
    (before yielding anything) for other kinds of tar."""
    mv, pos, n = memoryview(data), 0, len(data)
    key: Optional[str] = None
    fields: dict[str, bytes] = {}
    out: list[tuple[str, dict]] = []
    broken = False
    while pos + 512 <= n:
        hdr = data[pos : pos + 512]
        if hdr.count(0) == 512:
            break  # end-of-archive blocks
        try:
            if sum(hdr) - sum(hdr[148:156]) + 256 != int(hdr[148:156].split(b"\0", 1)[0].strip() or b"0", 8):
                raise ValueError("header checksum")
            flag = hdr[156:157]
            if flag not in (b"0", b"\0", b"5") or hdr[124] & 0x80:
                raise _UseTarfile
            name = hdr[:100].split(b"\0", 1)[0].decode()
            prefix = hdr[345:500].split(b"\0", 1)[0] if hdr[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode() + "/" + name
            size = int(hdr[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except (ValueError, UnicodeDecodeError):  # a corrupt header: the tar ends here
            broken = True
            break
        start = pos + 512
        pos = start + (size + 511) // 512 * 512
        if flag == b"5":
            continue
        if start + size > n:  # the member's data is cut
            broken = True
            break
        k, _, ext = name.rsplit("/", 1)[-1].partition(".")
        if k != key and key is not None:
            out.append((key, fields))
            fields = {}
        key = k
        fields[ext.lower()] = bytes(mv[start : start + size])
    if not broken and pos < n and data[pos:].count(0) != n - pos:
        broken = True  # a partial header at the end
    if broken:
        if key is not None and complete(fields):
            out.append((key, fields))
            key = None
        out.append((key or "<unknown>", None))
    elif key is not None:
        out.append((key, fields))
    return iter(out)


def read_samples(files: TarShards, shard: int, lo: int, hi: int) -> list[Optional[tuple[str, dict]]]:
    """Samples [lo, hi) (tar order) of a shard as (key, fields), None for each one that cannot be
    read (shard missing, tar truncated or corrupt). Raises StorageError when storage fails."""
    name, count = files.shards[shard]
    url = join(files.url, name)
    out: list[Optional[tuple[str, dict]]] = [None] * (hi - lo)
    if url in files.missing:
        return out
    skip, f, data = 0, None, None  # skip: samples to pass over before `lo` (streaming from the start)
    try:
        fs, path = filesystem(url, files.storage)
        offs = _offsets(files, shard) if (lo, hi) != (0, count) else None
        if (lo, hi) == (0, count):
            data = fs.cat_file(path)
        elif offs is not None:
            start, end = int(offs[lo]), int(offs[hi])
            try:
                data = fs.cat_file(path, start=start, end=end)
            except OSError as e:  # S3: a range that starts past the end of a truncated object (HTTP 416)
                if e.errno != errno.EINVAL or isinstance(e, FileNotFoundError) or fs.size(path) > start:
                    raise
                data = b""
        else:
            warn_once(f"nooffsets:{files.url}", "shards in %s have no sample offsets in their markers (written by an older "
                      "version); chunks inside a shard are read by streaming the tar from its start", files.url)
            f, skip = fs.open(path, "rb", block_size=16 << 20), lo
    except FileNotFoundError:
        files.missing.add(url)
        log.warning("shard listed in the index is missing: %s; skipping its samples", url)
        return out
    except Exception as e:  # noqa: BLE001
        raise storage_error(url, files.storage, e) from e
    if data is not None:
        try:
            samples = _tar_samples(data, files.complete)
        except _UseTarfile:
            f = io.BytesIO(data)
    n = 0
    try:
        for key, fields in (samples if f is None else iter_tar_samples(f, url, files.complete)):
            if fields is None or n >= skip + len(out):
                break
            if n >= skip:
                out[n - skip] = (key, fields)
            n += 1
    except (StorageError, FileNotFoundError):
        raise
    except OSError as e:
        raise storage_error(url, files.storage, e) from e
    finally:
        if f is not None:
            f.close()
    if n < skip + len(out):
        warn_once(f"trunc:{url}", "shard %s is truncated or corrupt: samples %d-%d of %d unreadable; skipping them "
                  "(further unreadable ranges of this shard are not reported)", url, lo + n - skip, hi - 1, count)
    return out
