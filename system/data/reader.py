"""Streaming, resumable reader of WebDataset shards: image shards (system/data/shards.py) and
token shards (system/data/tokens.py) share this machinery; a `SampleCodec` is all that differs.

Samples and epoch order. The reader uses the first `ceil(fraction * total)` samples of the index
(index order, tar order within a shard): N samples with ids 0..N-1. Each shard's used samples are
cut into chunks of at most `chunk_size` consecutive samples (near-equal sizes). Epoch e's order
is a permutation of the N ids: the chunks permuted with rng(seed, e), the samples of each chunk
permuted with rng(seed, e, chunk). A chunk is one sequential (ranged) tar read (a worker whose
share starts or ends inside a chunk reads the part of it that covers its samples).

Partition (by samples, not shards). An epoch is dealt to `world_size` ranks x `K = max(num_workers,
1)` slots (a slot is what one dataloader worker reads):
  * drop_last=True (training): every rank gets exactly `T = N // (world_size * batch_size)`
    batches of `batch_size` per epoch; rank r takes positions [r*T*B, (r+1)*T*B) of the order.
    The remainder, the last `N - world_size * T * B < world_size * batch_size` positions of the
    epoch's order (other samples each epoch), is dropped. No batch spans two epochs.
  * drop_last=False (validation): every sample once; rank shares differ by at most one sample
    (ranks r < N % world_size get one more); each rank's last batch of the epoch may be short.
  Within a rank, batch j of the epoch belongs to slot j % K; a slot's batches are one contiguous
  piece of the rank's share, so a worker reads its chunks sequentially; the rank's batches come
  in order j = 0, 1, ... (worker `(j - j0) % K` makes batch j, j0 the first batch of the session).
  So in lockstep (every rank draws the same number of batches, as the training loop does) every
  sample of an epoch is seen exactly once, except the dropped remainder.

Unreadable data (corrupt or incomplete sample, truncated or corrupt tar, shard object missing)
is skipped on every layout and never kills the job; only an epoch without one readable sample
raises. Storage errors (unreachable endpoint, credentials: `StorageError`) are not skipped.
  * drop_last=True: a bad sample at index i of its slot (n samples) is replaced by the first
    readable sample at slot index (i + n//2 + m) % n, m = 0, 1, ... (a bad region is filled from
    the other half of the slot, one substitute per bad sample; when the whole slot is unreadable,
    by the first readable sample of the epoch's order). Batches keep `batch_size` samples and
    every rank yields the same number of batches (`batches_per_epoch()`), so ranks stay in step;
    a substitute is an extra copy of a sample that is also seen in its own place, so the epoch
    shows it twice (or more, when several bad samples fall on it). Replacement depends only on
    (seed, epoch, layout, which data is readable), so a resumed run reproduces it.
  * drop_last=False: bad samples are left out (batches may be shorter; a batch with no readable
    sample is not yielded).
  `skipped` counts the distinct bad samples (by id) among the planned samples of the batches this
  rank handed out, once each: not again in later epochs, retries or after a resume (the ids are
  part of the state).

Position (world-size independent). `state_dict()` is the same on every rank of a lockstep run
(bar the rank's `bad` ids): the epoch, the positions of the epoch's order consumed by all ranks
together (`consumed`, intervals), and the current segment (`base`: positions consumed before the
layout in use started, `layout`, `batches`: batches each rank drew since). Loading it with the
same layout (world_size, workers, batch_size, drop_last) continues exactly the batches an
uninterrupted run would have produced. Loading it with another layout deals the epoch's
remaining positions (not in `consumed`) afresh, as above, over the new ranks and workers (the
remainder rule applies to the remaining positions); every sample of the epoch is still seen
exactly once (bar the remainders). Later epochs are dealt in full.

Prefetch: each stream (worker) fetches the bytes of its next chunk in a background thread while
the current one is decoded (one chunk ahead). Ranged reads use per-sample byte offsets from the
shard's marker (`<shard>.done.json`, written by shards.write_tar); without them a chunk that does
not start a shard is read by streaming the tar from its start. `pin_memory=True` pins batches
(pass it when the batches go to a CUDA device; ignored, with a warning, where CUDA is absent).

`ShardReader` yields {"image", "label", "key"} (a latent cache: also "latents"); `TokenShardReader`
yields {"codes", "label", "key"}.
"""
from __future__ import annotations

import bisect
import errno
import hashlib
import io
import logging
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from system.config import DataConfig, StorageConfig, TokenDataConfig
from system.data.embedded import ensure_embedded_dataset
from system.data.latents import decode_latent_sample, latent_complete, latent_meta
from system.data.shards import IMAGE_FIELDS, image_complete, iter_tar_samples, read_index, read_marker
from system.data.source import BatchSource
from system.data.storage import StorageError, filesystem, join, storage_error
from system.data.tokens import decode_token_sample, meta_dtype, token_meta
from system.data.transforms import center_crop_arr, decode_rgb, flip_decision, to_tensor

log = logging.getLogger(__name__)

STATE_FORMAT = 2
DEFAULT_CHUNK_SIZE = 256

Intervals = list[list[int]]  # sorted, disjoint, non-adjacent [start, end) ranges


# ---------------------------------------------------------------------------- intervals
def merge(iv) -> Intervals:
    """Sorted, merged [start, end) intervals (empty ones dropped)."""
    out: Intervals = []
    for a, b in sorted((int(a), int(b)) for a, b in iv if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def complement(iv: Intervals, n: int) -> Intervals:
    out, prev = [], 0
    for a, b in iv:
        if a > prev:
            out.append([prev, a])
        prev = max(prev, b)
    if prev < n:
        out.append([prev, n])
    return out


def total(iv: Intervals) -> int:
    return sum(b - a for a, b in iv)


class _Remaining:
    """The positions of an epoch's order not in `base`, as one sequence R (increasing)."""

    def __init__(self, n: int, base: Intervals):
        self.free = complement(base, n)
        self.cum = [0]
        for a, b in self.free:
            self.cum.append(self.cum[-1] + b - a)

    def __len__(self) -> int:
        return self.cum[-1]

    def intervals(self, i: int, j: int) -> Intervals:
        """Positions R[i:j] as intervals."""
        out: Intervals = []
        if j <= i:
            return out
        k = bisect.bisect_right(self.cum, i) - 1
        while i < j:
            a, b = self.free[k]
            lo = a + i - self.cum[k]
            hi = min(b, a + j - self.cum[k])
            out.append([lo, hi])
            i += hi - lo
            k += 1
        return out

    def positions(self, i: int, j: int) -> np.ndarray:
        parts = [np.arange(a, b, dtype=np.int64) for a, b in self.intervals(i, j)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------- samples, chunks, order
@dataclass(frozen=True)
class Chunk:
    shard: int  # index into the reader's shard list
    start: int  # first sample of the chunk in the shard's tar order
    size: int
    first: int  # id of its first sample (ids number the used samples in index order)


def build_chunks(shards: list[dict], chunk_size: int = DEFAULT_CHUNK_SIZE,
                 fraction: float = 1.0) -> tuple[list[tuple[str, int]], list[Chunk]]:
    """((name, count) of the shards in use, chunks): the first `fraction` of the samples (index
    order), each shard's used samples cut into near-equal chunks of at most `chunk_size`."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    left = math.ceil(fraction * sum(int(s["count"]) for s in shards))
    used: list[tuple[str, int]] = []
    chunks: list[Chunk] = []
    first = 0
    for s in shards:
        if left <= 0:
            break
        n = min(int(s["count"]), left)
        left -= n
        if n <= 0:
            continue
        k = math.ceil(n / chunk_size)
        bounds = [round(n * i / k) for i in range(k + 1)]
        for a, b in zip(bounds, bounds[1:]):
            chunks.append(Chunk(len(used), a, b - a, first + a))
        used.append((str(s["name"]), int(s["count"])))
        first += n
    return used, chunks


class EpochOrder:
    """Epoch `epoch`'s order of the sample ids: chunks permuted with rng(seed, epoch), the samples
    of each chunk permuted with rng(seed, epoch, chunk). `ids(positions)` maps positions to ids."""

    def __init__(self, chunks: list[Chunk], seed: int, epoch: int):
        self.chunks, self.seed, self.epoch = chunks, seed, epoch
        self.perm = np.random.default_rng([seed, epoch]).permutation(len(chunks))
        sizes = np.array([chunks[c].size for c in self.perm], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self._within: dict[int, np.ndarray] = {}

    def _inner(self, c: int) -> np.ndarray:
        if c not in self._within:
            self._within[c] = np.random.default_rng([self.seed, self.epoch, c]).permutation(self.chunks[c].size)
        return self._within[c]

    def ids(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty(len(positions), dtype=np.int64)
        if not len(positions):
            return out
        k = np.searchsorted(self.starts, positions, side="right") - 1
        order = np.argsort(k, kind="stable")
        ks = k[order]
        cuts = np.flatnonzero(np.diff(ks)) + 1
        for group in np.split(order, cuts):
            kk = int(k[group[0]])
            c = int(self.perm[kk])
            out[group] = self.chunks[c].first + self._inner(c)[positions[group] - self.starts[kk]]
        return out


# ---------------------------------------------------------------------------- the deal
@dataclass(frozen=True)
class Layout:
    world_size: int
    workers: int  # slots per rank: max(num_workers, 1)
    batch_size: int
    drop_last: bool

    def as_dict(self) -> dict:
        return {"world_size": self.world_size, "workers": self.workers, "batch_size": self.batch_size,
                "drop_last": self.drop_last}


class Plan:
    """How the positions of an epoch not in `base` are dealt to ranks, slots and batches."""

    def __init__(self, n: int, base: Intervals, layout: Layout):
        self.layout, self.base = layout, base
        self.rem = _Remaining(n, base)
        m, w, b = len(self.rem), layout.world_size, layout.batch_size
        if layout.drop_last:
            t = m // (w * b)
            self.shares = [t * b] * w
        else:
            self.shares = [m // w + (r < m % w) for r in range(w)]
        self.rank_start = [0]
        for share in self.shares[:-1]:
            self.rank_start.append(self.rank_start[-1] + share)

    def num_batches(self, rank: int) -> int:
        return math.ceil(self.shares[rank] / self.layout.batch_size)

    def _slot_size(self, rank: int, slot: int) -> int:
        """Samples of the slot: its batches j = slot, slot + K, ... < T (only batch T-1 may be short)."""
        k, b, t = self.layout.workers, self.layout.batch_size, self.num_batches(rank)
        n = len(range(slot, t, k)) * b
        if t and (t - 1) % k == slot:
            n -= t * b - self.shares[rank]
        return n

    def slot_range(self, rank: int, slot: int) -> tuple[int, int]:
        """[start, end) of the slot in R (the remaining positions)."""
        a = self.rank_start[rank] + sum(self._slot_size(rank, s) for s in range(slot))
        return a, a + self._slot_size(rank, slot)

    def consumed(self, k: int) -> Intervals:
        """Positions used once every rank has drawn min(k, its batches) batches (with base)."""
        out = list(self.base)
        kk, b = self.layout.workers, self.layout.batch_size
        for r in range(self.layout.world_size):
            kr = min(k, self.num_batches(r))
            for s in range(kk):
                a, e = self.slot_range(r, s)
                done = len(range(s, kr, kk)) * b
                out += self.rem.intervals(a, min(a + done, e))
        return merge(out)


# ---------------------------------------------------------------------------- codecs
class SampleCodec:
    """What a reader does with one sample's tar members: `decode` -> (value, label) (raises on a
    corrupt sample, which is then skipped and counted); `batch_fields` turns a batch's values into
    its entries {name: tensor} (by default `collate` stacks arrays into the one entry named
    `field`; a codec that fills several entries overrides `batch_fields`). Picklable (it travels to
    dataloader workers)."""

    field = "sample"  # the batch entry (and the name of a sample in warnings)

    def complete(self, fields: dict[str, bytes]) -> bool:
        raise NotImplementedError

    def decode(self, key: str, fields: dict[str, bytes], epoch: int) -> tuple[Any, int]:
        raise NotImplementedError

    def collate(self, arrays: list[np.ndarray]) -> torch.Tensor:
        raise NotImplementedError

    def batch_fields(self, values: list[Any]) -> dict[str, torch.Tensor]:
        return {self.field: self.collate(values)}


@dataclass(frozen=True)
class ImageCodec(SampleCodec):
    """Image bytes -> center-cropped uint8 (R, R, 3), mirrored by a per-(seed, epoch, key) coin."""

    resolution: int
    random_flip: bool
    seed: int
    field = "image"

    def complete(self, fields: dict[str, bytes]) -> bool:
        return image_complete(fields)

    def decode(self, key: str, fields: dict[str, bytes], epoch: int) -> tuple[np.ndarray, int]:
        img = next(fields[k] for k in IMAGE_FIELDS if k in fields)
        label = int(fields["cls"])
        arr = center_crop_arr(decode_rgb(img), self.resolution)  # = transforms.preprocess, without its flip copy
        return (arr[:, ::-1] if self.random_flip and flip_decision(self.seed, epoch, key) else arr), label

    def collate(self, arrays: list[np.ndarray]) -> torch.Tensor:
        return to_tensor(arrays)


@dataclass(frozen=True)
class TokenCodec(SampleCodec):
    """Raw codes -> int64 (L,) (dtype and length from the index's `tokens` section)."""

    dtype: str  # numpy dtype string, e.g. "<u2"
    seq_len: int
    field = "codes"

    def complete(self, fields: dict[str, bytes]) -> bool:
        return "tok" in fields and "cls" in fields

    def decode(self, key: str, fields: dict[str, bytes], epoch: int) -> tuple[np.ndarray, int]:
        codes, label, _ = decode_token_sample(fields, np.dtype(self.dtype), self.seq_len)
        return codes, label

    def collate(self, arrays: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(arrays))


@dataclass(frozen=True)
class LatentCodec(SampleCodec):
    """A latent-cache sample (system/data/latents.py) -> (view pixels uint8 (R, R, 3), latents
    float16 (C, h, w)); batches get "image" (float (B, 3, R, R) in [-1, 1], exactly the pixels the
    VAE encoded: no flip on top, the cache's views are the augmentation) and "latents" (float32)."""

    resolution: int
    channels: int
    size: int
    field = "latent sample"

    def complete(self, fields: dict[str, bytes]) -> bool:
        return latent_complete(fields)

    def decode(self, key: str, fields: dict[str, bytes], epoch: int) -> tuple[tuple[np.ndarray, np.ndarray], int]:
        pixels, latents, label, _ = decode_latent_sample(fields, self.channels, self.size, self.resolution)
        return (pixels, latents), label

    def batch_fields(self, values: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
        return {"image": to_tensor([p for p, _ in values]),
                "latents": torch.from_numpy(np.stack([z for _, z in values])).float()}


# ---------------------------------------------------------------------------- reading
@dataclass
class _Spec:
    url: str
    storage: StorageConfig
    shards: list[tuple[str, int]]  # (name, samples in the shard)
    chunks: list[Chunk]
    num_samples: int
    seed: int
    layout: Layout
    codec: SampleCodec
    prefetch: bool
    # per reader (and per worker process): shards found missing, per-sample byte offsets by shard
    missing: set = field(default_factory=set, repr=False)
    offsets: dict = field(default_factory=dict, repr=False)


_WARNED: set[str] = set()
_LOCK = threading.Lock()


def _warn_once(tag: str, msg: str, *args) -> None:
    with _LOCK:
        if tag in _WARNED:
            return
        _WARNED.add(tag)
    log.warning(msg, *args)


def _offsets(spec: _Spec, shard: int) -> Optional[np.ndarray]:
    """Byte offset of each sample's first tar member (+ the end of the last), from the shard's
    marker; None when the marker lacks them (shards written before they were recorded)."""
    name, count = spec.shards[shard]
    url = join(spec.url, name)
    if url not in spec.offsets:
        try:
            marker = read_marker(spec.url, name, spec.storage) or {}
        except (FileNotFoundError, ValueError):
            marker = {}
        offs = marker.get("offsets")
        ok = isinstance(offs, list) and len(offs) == count + 1 and all(a < b for a, b in zip(offs, offs[1:]))
        spec.offsets[url] = np.asarray(offs, dtype=np.int64) if ok else None
    return spec.offsets[url]


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


def read_samples(spec: _Spec, shard: int, lo: int, hi: int) -> list[Optional[tuple[str, dict]]]:
    """Samples [lo, hi) (tar order) of a shard as (key, fields), None for each one that cannot be
    read (shard missing, tar truncated or corrupt). Raises StorageError when storage fails."""
    name, count = spec.shards[shard]
    url = join(spec.url, name)
    out: list[Optional[tuple[str, dict]]] = [None] * (hi - lo)
    if url in spec.missing:
        return out
    skip, f, data = 0, None, None  # skip: samples to pass over before `lo` (streaming from the start)
    try:
        fs, path = filesystem(url, spec.storage)
        offs = _offsets(spec, shard) if (lo, hi) != (0, count) else None
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
            _warn_once(f"nooffsets:{spec.url}", "shards in %s have no sample offsets in their markers (written by an older "
                       "version); chunks inside a shard are read by streaming the tar from its start", spec.url)
            f, skip = fs.open(path, "rb", block_size=16 << 20), lo
    except FileNotFoundError:
        spec.missing.add(url)
        log.warning("shard listed in the index is missing: %s; skipping its samples", url)
        return out
    except Exception as e:  # noqa: BLE001
        raise storage_error(url, spec.storage, e) from e
    if data is not None:
        try:
            samples = _tar_samples(data, spec.codec.complete)
        except _UseTarfile:
            f = io.BytesIO(data)
    n = 0
    try:
        for key, fields in (samples if f is None else iter_tar_samples(f, url, spec.codec.complete)):
            if fields is None or n >= skip + len(out):
                break
            if n >= skip:
                out[n - skip] = (key, fields)
            n += 1
    except (StorageError, FileNotFoundError):
        raise
    except OSError as e:
        raise storage_error(url, spec.storage, e) from e
    finally:
        if f is not None:
            f.close()
    if n < skip + len(out):
        _warn_once(f"trunc:{url}:{lo}", "shard %s is truncated or corrupt: samples %d-%d of %d unreadable; skipping them",
                   url, lo + n - skip, hi - 1, count)
    return out


class _SlotReader:
    """The samples of one slot (a sequence of sample ids) of one epoch: chunk-wise reads, the next
    chunk fetched in a background thread while the current one is decoded; decoded samples with
    their bad ones replaced (see the module docstring)."""

    CACHE = 4  # fetched runs kept: the current and next of the main cursor, the same for substitutes

    def __init__(self, spec: _Spec, epoch: int, ids: np.ndarray, fallback: Callable[[], tuple]):
        self.spec, self.epoch, self.ids, self.fallback = spec, epoch, ids, fallback
        firsts = np.array([c.first for c in spec.chunks], dtype=np.int64)
        chunk_of = np.searchsorted(firsts, ids, side="right") - 1
        cuts = np.flatnonzero(np.diff(chunk_of)) + 1 if len(ids) else np.zeros(0, np.int64)
        self.run_start = np.concatenate([[0], cuts]).astype(np.int64) if len(ids) else np.zeros(0, np.int64)
        self.run_chunk = chunk_of[self.run_start] if len(ids) else np.zeros(0, np.int64)
        self.cache: dict[int, Future] = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch") if spec.prefetch else None
        self.good: dict[int, bool] = {}  # slot index -> readable (memo for substitute searches)
        self.dead = False

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.cache.clear()

    def _run_of(self, i: int) -> int:
        return int(np.searchsorted(self.run_start, i, side="right") - 1)

    def _fetch(self, run: int) -> tuple[int, list]:
        """(shard offset of the first entry, samples) of a run: the range of its chunk covering the
        samples the run needs."""
        a = int(self.run_start[run])
        b = int(self.run_start[run + 1]) if run + 1 < len(self.run_start) else len(self.ids)
        c = self.spec.chunks[int(self.run_chunk[run])]
        offs = self.ids[a:b] - c.first
        lo, hi = c.start + int(offs.min()), c.start + int(offs.max()) + 1
        return lo, read_samples(self.spec, c.shard, lo, hi)

    def _get(self, run: int) -> Future:
        """The fetch of `run` (started now unless cached or in flight); recently used runs stay."""
        fut = self.cache.pop(run, None)
        if fut is None:
            if self.pool is None:
                fut = Future()
                try:
                    fut.set_result(self._fetch(run))
                except BaseException as e:  # noqa: BLE001 - raised by fut.result()
                    fut.set_exception(e)
            else:
                fut = self.pool.submit(self._fetch, run)
        self.cache[run] = fut  # most recently used last
        while len(self.cache) > self.CACHE:
            self.cache.pop(next(iter(self.cache)))
        return fut

    def raw(self, i: int) -> Optional[tuple[str, dict]]:
        run = self._run_of(i)
        fut = self._get(run)
        if self.pool is not None and run + 1 < len(self.run_start) and run + 1 not in self.cache:
            self._get(run + 1)  # one chunk ahead: fetched in the background while this one is decoded
        lo, samples = fut.result()
        c = self.spec.chunks[int(self.run_chunk[run])]
        return samples[c.start + int(self.ids[i] - c.first) - lo]

    def decoded(self, i: int) -> Optional[tuple[Any, int, str]]:
        """(array, label, key) of slot index i, None when it cannot be read or decoded."""
        if self.good.get(i) is False:
            return None
        shard = self.spec.shards[self.spec.chunks[int(self.run_chunk[self._run_of(i)])].shard][0]
        out = _decode(self.spec, self.raw(i), join(self.spec.url, shard), self.epoch)
        self.good[i] = out is not None
        return out

    def substitute(self, i: int) -> tuple[Any, int, str]:
        n = len(self.ids)
        if not self.dead:
            d = max(1, n // 2)
            for m in range(n):
                c = (i + d + m) % n
                if c != i and self.good.get(c) is not False:
                    out = self.decoded(c)
                    if out is not None:
                        return out
            self.dead = True
        return self.fallback()


def _decode(spec: _Spec, raw: Optional[tuple[str, dict]], url: str, epoch: int) -> Optional[tuple[Any, int, str]]:
    if raw is None:
        return None
    key, fields = raw
    codec = spec.codec
    if not codec.complete(fields):
        log.warning("skipping incomplete sample %r in %s (fields: %s)", key, url, sorted(fields))
        return None
    try:
        arr, label = codec.decode(key, fields, epoch)
    except Exception as e:  # noqa: BLE001 - any decode failure skips the sample
        log.warning("skipping corrupt %s %r in %s: %s: %s", codec.field, key, url, type(e).__name__, e)
        return None
    return arr, label, key


class _RankBatches(IterableDataset):
    """One rank's batches from a position on: batch g of the session (g = 0, 1, ...) is made by
    worker g % K. Ends after epoch `stop_epoch` (None: never)."""

    def __init__(self, spec: _Spec, rank: int, epoch: int, base: Intervals, k: int, stop_epoch: Optional[int]):
        self.spec, self.rank, self.start, self.stop_epoch = spec, rank, (epoch, base, k), stop_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        sp = self.spec
        epoch, base, k = self.start
        g0 = 0  # session index of batch k of the current segment
        while True:
            plan = Plan(sp.num_samples, base, sp.layout)
            t = plan.num_batches(self.rank)
            j = k + (w - g0) % nw  # this worker's first batch of the segment
            if j < t:
                yield from self._segment(plan, epoch, j, t, g0 - k, nw)
            g0 += t - k
            if self.stop_epoch is not None and epoch >= self.stop_epoch:
                return
            epoch, base, k = epoch + 1, [], 0

    def _segment(self, plan: Plan, epoch: int, j0: int, t: int, g_shift: int, nw: int) -> Iterator[dict[str, Any]]:
        sp = self.spec
        order = EpochOrder(sp.chunks, sp.seed, epoch)
        slot = j0 % sp.layout.workers
        a, e = plan.slot_range(self.rank, slot)
        ids = order.ids(plan.rem.positions(a, e))
        first_good: list = []

        def fallback() -> tuple:
            if not first_good:
                everything = _SlotReader(sp, epoch, order.ids(np.arange(sp.num_samples)), lambda: None)
                try:
                    for i in range(sp.num_samples):
                        out = everything.decoded(i)
                        if out is not None:
                            first_good.append(out)
                            break
                finally:
                    everything.close()
                if not first_good:
                    raise RuntimeError(f"no readable samples in {sp.url} in epoch {epoch} ({sp.num_samples} samples in "
                                       f"{len(sp.shards)} shards: all missing, truncated or corrupt; see the warnings)")
            return first_good[0]

        reader = _SlotReader(sp, epoch, ids, fallback)
        b = sp.layout.batch_size
        try:
            for j in range(j0, t, nw):
                i0 = (j // sp.layout.workers) * b
                i1 = min(i0 + b, len(ids))
                items, bad = [], []
                for i in range(i0, i1):
                    out = reader.decoded(i)
                    if out is None:
                        bad.append(int(ids[i]))
                        if sp.layout.drop_last:
                            out = reader.substitute(i)
                    if out is not None:
                        items.append(out)
                batch: dict[str, Any] = {"_g": j + g_shift, "_epoch": epoch, "_j": j, "_bad": bad}
                if items:
                    batch.update({**sp.codec.batch_fields([x[0] for x in items]),
                                  "label": torch.tensor([x[1] for x in items], dtype=torch.long),
                                  "key": [x[2] for x in items]})
                else:
                    fallback()  # raises when nothing in the epoch can be read (else this would spin forever)
                    batch["_empty"] = True
                yield batch
        finally:
            reader.close()


# ---------------------------------------------------------------------------- the source
class ShardSource(BatchSource):
    """Infinite iterable of one rank's batches {<codec's entries>: (B, ...), "label": long (B,),
    "key": list[str]} from a shard set; `codec(index)` says how samples decode. Partition,
    remainder, unreadable data and position: see the module docstring. `epoch` is the epoch of
    the last batch handed out; `skipped` the distinct unreadable samples met by this rank."""

    def __init__(
        self,
        url: str,
        codec: Callable[[dict], SampleCodec],
        *,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
        fraction: float = 1.0,
        storage: StorageConfig | None = None,
        drop_last: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        prefetch: bool = True,
        pin_memory: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size <= 0 or num_workers < 0:
            raise ValueError(f"need batch_size > 0, num_workers >= 0; got {batch_size}, {num_workers}")
        storage = storage or StorageConfig()
        self.url, self.rank, self.world_size, self.num_workers = url.rstrip("/"), rank, world_size, num_workers
        self.seed, self.fraction, self.chunk_size = seed, fraction, chunk_size
        self.pin_memory = pin_memory and torch.cuda.is_available()
        if pin_memory and not self.pin_memory:
            _warn_once("pin", "pin_memory=True but CUDA is not available: batches are not pinned")
        self.index = read_index(self.url, storage)  # early: unreachable endpoint / bad credentials
        sample_codec = codec(self.index)
        self.classes: dict[str, int] = dict(self.index["classes"])
        shards, chunks = build_chunks(self.index["shards"], chunk_size, fraction)
        self._check_shards(storage, [n for n, _ in shards])
        self.num_samples = sum(c.size for c in chunks)
        self.layout = Layout(world_size, max(num_workers, 1), batch_size, drop_last)
        need = world_size * batch_size if drop_last else world_size
        if self.num_samples < need:
            raise ValueError(
                f"{self.num_samples} samples of {self.url} (fraction {fraction}) cannot give each of {world_size} rank(s) "
                + (f"one batch of {batch_size} (drop_last): use a smaller batch_size or more data" if drop_last
                   else "one sample")
            )
        self._spec = _Spec(self.url, storage, shards, chunks, self.num_samples, seed, self.layout, sample_codec, prefetch)
        self._shard_id = hashlib.sha256(repr(shards).encode()).hexdigest()[:16]
        self._epoch, self._base, self._k = 0, [], 0  # position: epoch, its segment's base, batches drawn in it
        self._plan_cache: Optional[tuple[tuple, Plan]] = None
        self._bad: set[int] = set()
        self.epoch = 0

    def _check_shards(self, storage: StorageConfig, names: list[str]) -> None:
        """Shards of the index absent from storage: a warning (their samples are skipped), or an
        error when none is there."""
        try:
            fs, root = filesystem(self.url, storage)
            present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
        except Exception as e:  # noqa: BLE001
            raise storage_error(self.url, storage, e) from e
        missing = [n for n in names if n not in present]
        if not missing:
            return
        urls = ", ".join(join(self.url, m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
        if len(missing) == len(names):
            raise FileNotFoundError(f"all {len(missing)} shard(s) listed in {join(self.url, 'index.json')} are missing: {urls}")
        log.warning("%d of %d shard(s) listed in %s are missing; their samples are skipped: %s", len(missing), len(names),
                    join(self.url, "index.json"), urls)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def skipped(self) -> int:
        return len(self._bad)

    def batches_per_epoch(self) -> int:
        """This rank's batches in a whole epoch (the same on every rank with drop_last=True)."""
        return Plan(self.num_samples, [], self.layout).num_batches(self.rank)

    def _plan(self) -> Plan:
        key = (self._epoch, tuple(map(tuple, self._base)))
        if self._plan_cache is None or self._plan_cache[0] != key:
            self._plan_cache = (key, Plan(self.num_samples, self._base, self.layout))
        return self._plan_cache[1]

    def _settle(self) -> None:
        """Move to the next epoch when this rank's share of the current segment is used up."""
        while self._k >= self._plan().num_batches(self.rank):
            self._epoch, self._base, self._k = self._epoch + 1, [], 0

    def _batches(self, stop_epoch: Optional[int] = None) -> Iterator[dict[str, Any]]:
        self._settle()
        ds = _RankBatches(self._spec, self.rank, self._epoch, list(self._base), self._k, stop_epoch)
        if self.num_workers == 0:
            it: Any = iter(ds)
        else:
            # a private generator: the loader's worker base seed would otherwise be drawn from the global torch
            # RNG, which the checkpoint saves (a resumed run would draw once more than an uninterrupted one)
            it = DataLoader(ds, batch_size=None, num_workers=self.num_workers, in_order=True, pin_memory=self.pin_memory,
                            generator=torch.Generator())
        g = 0
        for batch in it:
            if batch.pop("_g") != g or batch["_epoch"] != self._epoch or batch["_j"] != self._k:
                raise RuntimeError(f"data batch order broken: expected batch {self._k} of epoch {self._epoch}, got "
                                   f"batch {batch['_j']} of epoch {batch['_epoch']}")
            g += 1
            self._bad.update(int(i) for i in batch.pop("_bad"))
            epoch = batch.pop("_epoch")
            batch.pop("_j")
            self._k += 1
            self._settle()
            if batch.pop("_empty", False):
                continue
            self.epoch = int(epoch)
            if self.pin_memory and self.num_workers == 0:
                batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
            yield batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._batches()

    def one_epoch(self) -> Iterator[dict[str, Any]]:
        """This rank's batches from the current position to the end of its epoch, then stop (for
        validation; on a fresh reader with drop_last=False every readable sample of the rank's
        share comes exactly once)."""
        self._settle()
        return self._batches(stop_epoch=self._epoch)

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed out; the same on every rank of a lockstep run
        except `bad`/`skipped` (this rank's unreadable samples). Plain lists and ints."""
        self._settle()
        return {
            "format": STATE_FORMAT,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "fraction": self.fraction,
            "chunk_size": self.chunk_size,
            "shards": self._shard_id,
            "epoch": self._epoch,
            "consumed": self._plan().consumed(self._k),
            "base": [list(x) for x in self._base],
            "layout": self.layout.as_dict(),
            "batches": self._k,
            "last_epoch": self.epoch,
            "bad": merge([[i, i + 1] for i in self._bad]),
            "skipped": len(self._bad),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`, saved by any rank of a run over the same shard set, seed,
        fraction and chunk_size, with any world_size / num_workers / batch_size (see the module
        docstring: the same layout continues exactly, another re-deals the epoch's rest)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                "data reader state has an older format (per-stream positions, saved before the reader dealt samples "
                f"instead of shards; keys {sorted(state)[:6]}): it cannot be resumed by this reader. Start the data "
                "position afresh (a new run, or drop reader.pt from the checkpoint)"
            )
        mine = {"seed": self.seed, "num_samples": self.num_samples, "fraction": self.fraction,
                "chunk_size": self.chunk_size, "shards": self._shard_id}
        for k, v in mine.items():
            if state.get(k) != v:
                raise ValueError(
                    f"data reader state was saved with {k}={state.get(k)!r} but this reader has {k}={v!r}; resuming the data "
                    "position needs the same seed, fraction, chunk_size and shard set (world size, workers and batch "
                    "size may differ)"
                )
        if state["layout"] == self.layout.as_dict():
            self._epoch, self._base, self._k = int(state["epoch"]), merge(state["base"]), int(state["batches"])
        else:
            self._epoch, self._base, self._k = int(state["epoch"]), merge(state["consumed"]), 0
        self._plan_cache = None
        self._bad = {i for a, b in state.get("bad", []) for i in range(int(a), int(b))}
        self.epoch = int(state.get("last_epoch", self._epoch))
        self._settle()


def _config_url(data: DataConfig | TokenDataConfig, val: bool) -> str:
    url = data.val_url if val else data.url
    if not url:
        raise ValueError("data.val_url is not set (needed for validation)" if val else "data.url is not set")
    return url


class ShardReader(ShardSource):
    """Batches {"image": float (B, 3, R, R) in [-1, 1], "label": long (B,), "key": list[str]} of
    an image shard set (center crop to `resolution`, seeded per-sample flips).

    A latent cache (an index with a `latents` section, cluster/latent_pool.py) is read with
    `LatentCodec`: batches also hold "latents" float (B, C, h, w), and "image" is exactly the view
    they encode; `resolution` must be the cache's, and `random_flip` is not applied (the cache's
    views, e.g. augment="flip", are the augmentation). `latent_meta`: the index's `latents`
    section (None for image shards)."""

    def __init__(self, url: str, *, resolution: int, seed: int = 0, random_flip: bool = True, **kwargs: Any):
        if resolution <= 0:
            raise ValueError(f"need resolution > 0, got {resolution}")
        self.resolution, self.random_flip = resolution, random_flip
        self.latent_meta: Optional[dict[str, Any]] = None
        super().__init__(url, self._codec, seed=seed, **kwargs)

    def _codec(self, index: dict) -> SampleCodec:
        if "latents" not in index:
            return ImageCodec(self.resolution, self.random_flip, self.seed)
        where = join(self.url, "index.json")
        meta = self.latent_meta = dict(latent_meta(index, where))
        if int(meta["resolution"]) != self.resolution:
            raise ValueError(f"data.resolution = {self.resolution}, but the latent cache {self.url} holds views encoded at "
                             f"{meta['resolution']} px ({where}: latents.resolution): set data.resolution="
                             f"{meta['resolution']}, or cache the latents again at resolution={self.resolution}")
        if self.random_flip and meta.get("augment") == "flip":
            log.info("data.random_flip is not applied to the latent cache %s: its views (each image and its mirror) "
                     "are the augmentation", self.url)
        elif self.random_flip:
            _warn_once(f"latflip:{self.url}", "data.random_flip is not applied to the latent cache %s: its views (augment "
                       "%r) are fixed; cache the latents with augment=flip to train on mirrored views too", self.url,
                       meta.get("augment"))
        return LatentCodec(self.resolution, int(meta["channels"]), int(meta["size"]))

    @classmethod
    def from_config(cls, data: DataConfig, *, rank: int, world_size: int, seed: int, val: bool = False,
                    pin_memory: bool = False) -> "ShardReader":
        """Reader for `data.url` (or `data.val_url` with val=True: no flips, short last batches);
        builds the embedded photo set there first when `data.embedded` is set. pin_memory: pin
        the batches (pass True when they go to a CUDA device)."""
        url = _config_url(data, val)
        if data.embedded:
            ensure_embedded_dataset(url, data.storage, split="val" if val else "train")
        return cls(
            url, rank=rank, world_size=world_size, batch_size=data.batch_size, resolution=data.resolution,
            num_workers=data.num_workers, seed=seed, random_flip=data.random_flip and not val,
            fraction=1.0 if val else data.fraction, storage=data.storage, drop_last=not val, pin_memory=pin_memory,
        )


class TokenShardReader(ShardSource):
    """Batches {"codes": long (B, L), "label": long (B,), "key": list[str]} of a token shard set
    (jobs/pretokenize.py; each (image, augmentation) view is one sample). `meta` is the index's
    `tokens` section (dtype, seq_len, vocab_size, augment, tokenizer)."""

    def __init__(self, url: str, **kwargs: Any):
        super().__init__(url, self._codec, **kwargs)

    def _codec(self, index: dict) -> TokenCodec:
        self.meta: dict[str, Any] = dict(token_meta(index, join(self.url, "index.json")))
        return TokenCodec(meta_dtype(self.meta).str, int(self.meta["seq_len"]))

    @property
    def seq_len(self) -> int:
        return int(self.meta["seq_len"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @classmethod
    def from_config(cls, data: TokenDataConfig, *, rank: int, world_size: int, seed: int,
                    val: bool = False, pin_memory: bool = False) -> "TokenShardReader":
        """Reader for `data.url` (or `data.val_url` with val=True: short last batches)."""
        return cls(
            _config_url(data, val), rank=rank, world_size=world_size, batch_size=data.batch_size,
            num_workers=data.num_workers, seed=seed, fraction=1.0 if val else data.fraction, storage=data.storage,
            drop_last=not val, pin_memory=pin_memory,
        )
