"""The epoch plan of the shard readers (system/data/stream.py): which sample ids an epoch holds, in
what order, and how the positions of that order are dealt to ranks, dataloader workers and batches.
Pure arithmetic: no I/O, so a test can simulate any number of ranks in one process.

Samples and epoch order. The reader uses the first `ceil(fraction * total)` samples of the index
(index order, tar order within a shard): N samples with ids 0..N-1. Each shard's used samples are
cut into chunks of at most `chunk_size` consecutive samples (near-equal sizes). Epoch e's order
is a permutation of the N ids: the chunks permuted with rng(seed, e), the samples of each chunk
permuted with rng(seed, e, chunk). A chunk is one sequential (ranged) tar read (a worker whose
share starts or ends inside a chunk reads the part of it that covers its samples).

Partition (by samples, not shards). An epoch is dealt to `world_size` ranks x `K = max(num_workers,
1)` slots (a slot is what one dataloader worker reads):
  * drop_last=True (training): every rank gets exactly `T = N // (world_size * batch_size)`
    batches of `batch_size` per epoch. The remainder, `N - world_size * T * B < world_size *
    batch_size` positions of the epoch's order drawn uniformly with rng(seed, epoch) (so every
    sample is as likely to be dropped, and other samples each epoch), is left out; rank r takes
    positions [r*T*B, (r+1)*T*B) of the rest. No batch spans two epochs.
  * drop_last=False (validation): every sample once; rank shares differ by at most one sample
    (ranks r < N % world_size get one more); each rank's last batch of the epoch may be short.
  Within a rank, batch j of the epoch belongs to slot j % K; a slot's batches are one contiguous
  piece of the rank's share, so a worker reads its chunks sequentially; the rank's batches come
  in order j = 0, 1, ... (worker `(j - j0) % K` makes batch j, j0 the first batch of the session).
  So in lockstep (every rank draws the same number of batches, as the training loop does) every
  sample of an epoch is seen exactly once, except the dropped remainder.

Substitutes (drop_last=True). An unreadable sample's place is taken by a readable one chosen by
`Substitutes`: a function of (seed, epoch, which samples are readable) alone, so the same on any
layout; one substitute per unreadable sample, spread over the epoch's samples, and no readable
sample stands in twice while clearly less than half the epoch is unreadable (up to ~40 %; from
about half on, some substitutes repeat): no sample is drawn more than twice in an epoch (its own
place and one substitution).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

DEFAULT_CHUNK_SIZE = 256
_DROP, _CYCLE = 2**32 - 1, 2**32 - 2  # rng stream tags (beside [seed, epoch] and [seed, epoch, chunk])

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

    def at(self, idx: np.ndarray) -> np.ndarray:
        """Positions R[idx]."""
        idx = np.asarray(idx, dtype=np.int64)
        k = np.searchsorted(np.asarray(self.cum, dtype=np.int64), idx, side="right") - 1
        starts = np.array([a for a, _ in self.free] or [0], dtype=np.int64)
        return starts[k] + idx - np.asarray(self.cum, dtype=np.int64)[k]


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
    """How the positions of epoch `epoch` not in `base` are dealt to ranks, slots and batches;
    with drop_last, `dropped` (the remainder, drawn with rng(seed, epoch)) is left out and `rem`
    is the sequence of the dealt positions."""

    def __init__(self, n: int, base: Intervals, layout: Layout, *, seed: int, epoch: int):
        self.layout, self.base = layout, base
        left = _Remaining(n, base)
        m, w, b = len(left), layout.world_size, layout.batch_size
        self.dropped = np.zeros(0, np.int64)
        if layout.drop_last:
            t = m // (w * b)
            self.shares = [t * b] * w
            pick = np.random.default_rng([seed, epoch, _DROP, m]).choice(m, m - w * t * b, replace=False)
            self.dropped = np.sort(left.at(pick))
            left = _Remaining(n, merge(base + [[int(p), int(p) + 1] for p in self.dropped]))
        else:
            self.shares = [m // w + (r < m % w) for r in range(w)]
        self.rem = left
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
        """[start, end) of the slot in `rem` (the dealt positions)."""
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


# ---------------------------------------------------------------------------- substitutes
class Substitutes:
    """The readable sample that stands in for each unreadable one in epoch `epoch` (drop_last),
    whatever the layout: the N ids in a random cycle (rng(seed, epoch)); walking the cycle on from
    an unreadable sample x, counting +1 for x and each unreadable sample and -1 for each readable
    one, x's substitute is the readable sample where the count first reaches 0 (x is matched like
    an opening bracket). `readable(id)` says whether a sample can be read and decoded."""

    MAX_WALK = 1024  # a walk this long (about half or more unreadable around x): the first readable met

    def __init__(self, n: int, seed: int, epoch: int, readable: Callable[[int], bool]):
        dtype = np.int32 if n < 2**31 else np.int64
        self.cycle = np.random.default_rng([seed, epoch, _CYCLE]).permutation(n).astype(dtype)
        self.where = np.empty(n, dtype=dtype)
        self.where[self.cycle] = np.arange(n, dtype=dtype)
        self.readable = readable
        self.crowded = False  # set once a walk found no match (more unreadable than readable around x)

    def of(self, x: int) -> Optional[int]:
        """The substitute of unreadable sample x; None when no sample of the epoch is readable."""
        n, p = len(self.cycle), int(self.where[x])
        count, first = 1, None
        for step in range(1, n):
            y = int(self.cycle[(p + step) % n])
            if not self.readable(y):
                count += 1
            elif count == 1:
                return y
            else:
                count -= 1
                first = y if first is None else first
            if first is not None and step >= self.MAX_WALK:
                break
        self.crowded = self.crowded or first is not None
        return first

    def first(self) -> Optional[int]:
        """The first readable sample of the cycle (None: nothing in the epoch is readable)."""
        return next((int(y) for y in self.cycle if self.readable(int(y))), None)
