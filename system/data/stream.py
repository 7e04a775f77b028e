"""Streaming, resumable readers of WebDataset shards: image shards (system/data/shards.py), token
shards (system/data/tokens.py) and latent caches (system/data/latents.py) share this machinery; a
`SampleCodec` (system/data/codec.py) is all that differs. Which samples an epoch holds, their order
and how they are dealt to ranks, workers and batches: system/data/plan.py; tar reads:
system/data/tario.py.

Unreadable data (corrupt or incomplete sample, truncated or corrupt tar, shard object missing)
is skipped on every layout and never kills the job; only an epoch without one readable sample
raises. Storage errors (unreachable endpoint, credentials: `StorageError`) are not skipped.
  * drop_last=True: a bad sample is replaced by its substitute (system/data/plan.py
    `Substitutes`: a readable sample of the epoch found by walking a seeded random cycle of all
    its samples, each read on its own; a different one for each bad sample while well under
    half the data is unreadable, so a bad shard's places are spread over the epoch and no
    sample is drawn more than twice in it). Batches keep `batch_size` samples and every rank yields the
    same number of batches (`batches_per_epoch()`), so ranks stay in step. Replacement depends
    only on (seed, epoch, which data is readable), not on the layout, so a resumed or resized
    run reproduces it.
  * drop_last=False: bad samples are left out (batches may be shorter; a batch with no readable
    sample is not yielded).
  `skipped` counts the distinct bad samples (by id) among the planned samples of the batches this
  rank handed out, once each: not again in later epochs, retries or after a resume (the ids are
  part of the state, keyed by the rank that met them). A state is continued by rank `s %
  world_size` for each saving rank s it holds: after a resize every new rank loads rank 0's
  position with the ids of every old rank merged in (cluster/restore.py), so each old rank's ids
  are carried on by exactly one new rank: the ranks' counts add up to the run's, none twice.

Position (world-size independent). `state_dict()` is the same on every rank of a lockstep run
(bar the rank's `bad` ids): the epoch, the positions of the epoch's order consumed by all ranks
together (`consumed`, intervals), and the current segment (`base`: positions consumed before the
layout in use started, `layout`, `batches`: batches each rank drew since). Loading it with the
same layout (world_size, workers, batch_size, drop_last) continues exactly the batches an
uninterrupted run would have produced. Loading it with another layout deals the epoch's
remaining positions (not in `consumed`) afresh, as above, over the new ranks and workers (the
remainder rule applies to the remaining positions); every sample of the epoch is still seen
exactly once (bar the remainders). Later epochs are dealt in full. A state saved when the
remainder was the tail of the order (no `deal` key) is re-dealt the same way on any layout.

Prefetch: each stream (worker) fetches the bytes of its next chunk in a background thread while
the current one is decoded (one chunk ahead); a chunk is one ranged read (system/data/tario.py).
`pin_memory=True` pins batches (pass it when the batches go to a CUDA device; ignored, with a
warning, where CUDA is absent).

`ShardReader` yields {"image", "label", "key"} (a latent cache: also "latents"); `TokenShardReader`
yields {"codes", "label", "key"}.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from system.config import ConfigError, DataConfig, StorageConfig, TokenDataConfig
from system.data import tario
from system.data.codec import ImageCodec, LatentCodec, SampleCodec, TokenCodec
from system.data.embedded import ensure_embedded_dataset
from system.data.latents import latent_meta
from system.data.plan import DEFAULT_CHUNK_SIZE, EpochOrder, Intervals, Layout, Plan, Substitutes, build_chunks, merge
from system.data.shards import read_index
from system.data.source import BatchSource
from system.data.storage import filesystem, join, storage_error
from system.data.tario import TarShards, warn_once
from system.data.tokens import meta_dtype, token_meta

log = logging.getLogger(__name__)

STATE_FORMAT = 2
DEAL = 2  # how positions are dealt; 2: the remainder drawn uniformly (1, no "deal" in the state: the tail)


@dataclass
class _Spec:
    """What a rank's workers need to make its batches (picklable: it travels to dataloader workers)."""

    files: TarShards
    chunks: list
    num_samples: int
    seed: int
    layout: Layout
    codec: SampleCodec
    prefetch: bool

    @functools.cached_property
    def _firsts(self) -> np.ndarray:
        return np.array([c.first for c in self.chunks], dtype=np.int64)

    def chunk_of(self, ids: np.ndarray) -> np.ndarray:
        """Index of the chunk holding each sample id."""
        return np.searchsorted(self._firsts, ids, side="right") - 1

    def shard_url(self, chunk: int) -> str:
        return join(self.files.url, self.files.shards[self.chunks[chunk].shard][0])

    def unreadable(self, epoch: int) -> RuntimeError:
        return RuntimeError(f"no readable samples in {self.files.url} in epoch {epoch} ({self.num_samples} samples in "
                            f"{len(self.files.shards)} shards: all missing, truncated or corrupt; see the warnings)")


class _SlotReader:
    """The samples of one slot (a sequence of sample ids) of one epoch: chunk-wise reads, the next
    chunk fetched in a background thread while the current one is decoded."""

    CACHE = 2  # fetched runs kept: the current one and the next

    def __init__(self, spec: _Spec, epoch: int, ids: np.ndarray):
        self.spec, self.epoch, self.ids = spec, epoch, ids
        chunk_of = spec.chunk_of(ids)
        cuts = np.flatnonzero(np.diff(chunk_of)) + 1 if len(ids) else np.zeros(0, np.int64)
        self.run_start = np.concatenate([[0], cuts]).astype(np.int64) if len(ids) else np.zeros(0, np.int64)
        self.run_chunk = chunk_of[self.run_start] if len(ids) else np.zeros(0, np.int64)
        self.cache: dict[int, Future] = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch") if spec.prefetch else None

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
        return lo, tario.read_samples(self.spec.files, c.shard, lo, hi)

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
        url = self.spec.shard_url(int(self.run_chunk[self._run_of(i)]))
        return self.spec.codec.sample(self.raw(i), url, self.epoch)


class _Probe:
    """Single samples of one epoch read one by one (a ranged read each), their readability
    remembered: what `Substitutes` walks to find the stand-in for an unreadable sample."""

    def __init__(self, spec: _Spec, epoch: int):
        self.spec, self.epoch = spec, epoch
        self.known: dict[int, bool] = {}
        self.last: tuple[int, Any] = (-1, None)  # the latest sample read: a walk ends on it
        self.subs = Substitutes(spec.num_samples, spec.seed, epoch, self.readable)

    def sample(self, i: int) -> Optional[tuple[Any, int, str]]:
        if self.last[0] != i:
            c = int(self.spec.chunk_of(np.array([i]))[0])
            chunk = self.spec.chunks[c]
            t = chunk.start + i - chunk.first
            raw = tario.read_samples(self.spec.files, chunk.shard, t, t + 1)[0]
            out = self.spec.codec.sample(raw, self.spec.shard_url(c), self.epoch)
            self.known[i], self.last = out is not None, (i, out)
        return self.last[1]

    def readable(self, i: int) -> bool:
        if i not in self.known:
            self.sample(i)
        return self.known[i]

    def substitute(self, i: int) -> tuple[Any, int, str]:
        """The sample that takes unreadable sample i's place (raises when none is readable)."""
        j = self.subs.of(i)
        if j is None:
            raise self.spec.unreadable(self.epoch)
        if self.subs.crowded:
            warn_once(f"crowded:{self.spec.files.url}", "about half or more of the samples of %s are unreadable in "
                      "places: some readable samples stand in for several unreadable ones", self.spec.files.url)
        return self.sample(j)

    def require_any(self) -> None:
        """Raise when no sample of the epoch is readable."""
        if self.subs.first() is None:
            raise self.spec.unreadable(self.epoch)


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
            plan = Plan(sp.num_samples, base, sp.layout, seed=sp.seed, epoch=epoch)
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
        a, e = plan.slot_range(self.rank, j0 % sp.layout.workers)
        ids = order.ids(plan.rem.positions(a, e))
        reader, probes = _SlotReader(sp, epoch, ids), []  # probes: a _Probe, made at the first unreadable sample

        def probe() -> _Probe:
            if not probes:
                probes.append(_Probe(sp, epoch))
            return probes[0]

        b = sp.layout.batch_size
        try:
            for j in range(j0, t, nw):
                i0 = (j // sp.layout.workers) * b
                items, bad = [], []
                for i in range(i0, min(i0 + b, len(ids))):
                    out = reader.decoded(i)
                    if out is None:
                        bad.append(int(ids[i]))
                        if sp.layout.drop_last:
                            out = probe().substitute(int(ids[i]))
                    if out is not None:
                        items.append(out)
                batch: dict[str, Any] = {"_g": j + g_shift, "_epoch": epoch, "_j": j, "_bad": bad}
                if items:
                    batch.update({**sp.codec.batch_fields([x[0] for x in items]),
                                  "label": torch.tensor([x[1] for x in items], dtype=torch.long),
                                  "key": [x[2] for x in items]})
                else:
                    probe().require_any()  # raises when nothing in the epoch can be read (else this would spin forever)
                    batch["_empty"] = True
                yield batch
        finally:
            reader.close()


# ---------------------------------------------------------------------------- the source
class ShardSource(BatchSource):
    """Infinite iterable of one rank's batches {<codec's entries>: (B, ...), "label": long (B,),
    "key": list[str]} from a shard set; `codec(index)` says how samples decode. Partition and
    remainder: system/data/plan.py; unreadable data and position: the module docstring. `epoch`
    is the epoch of the last batch handed out; `skipped` the distinct unreadable samples met by this rank."""

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
            warn_once("pin", "pin_memory=True but CUDA is not available: batches are not pinned")
        self.index = read_index(self.url, storage)  # early: unreachable endpoint / bad credentials
        sample_codec = codec(self.index)
        self.classes: dict[str, int] = dict(self.index["classes"])
        shards, chunks = build_chunks(self.index["shards"], chunk_size, fraction)
        self._check_shards(storage, [n for n, _ in shards])
        self.num_samples = sum(c.size for c in chunks)
        self.layout = Layout(world_size, max(num_workers, 1), batch_size, drop_last)
        need = world_size * batch_size if drop_last else world_size
        if self.num_samples < need:  # a ConfigError: a restarted pool would meet it again (cluster/train_pool.py)
            raise ConfigError(
                (f"config key 'data.batch_size' = {batch_size}: " if drop_last else
                 f"config key 'cluster.num_workers' = {world_size}: ") + f"{self.num_samples} samples of {self.url} (fraction "
                f"{fraction}) cannot give each of {world_size} rank(s) "
                + (f"one batch of {batch_size} (drop_last): use a smaller batch_size or more data" if drop_last
                   else "one sample")
            )
        self._spec = _Spec(TarShards(self.url, storage, shards, sample_codec.complete), chunks, self.num_samples, seed,
                           self.layout, sample_codec, prefetch)
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
        return Plan(self.num_samples, [], self.layout, seed=self.seed, epoch=0).num_batches(self.rank)

    def _plan(self) -> Plan:
        key = (self._epoch, tuple(map(tuple, self._base)))
        if self._plan_cache is None or self._plan_cache[0] != key:
            self._plan_cache = (key, Plan(self.num_samples, self._base, self.layout, seed=self.seed, epoch=self._epoch))
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
        except `bad`/`skipped` (this rank's unreadable samples: {rank: id intervals}). Plain lists,
        dicts and ints."""
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
            "deal": DEAL,
            "batches": self._k,
            "last_epoch": self.epoch,
            "bad": {str(self.rank): merge([[i, i + 1] for i in self._bad])} if self._bad else {},
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
                raise ConfigError(
                    f"data reader state was saved with {k}={state.get(k)!r} but this reader has {k}={v!r}; resuming the data "
                    "position needs the same seed, fraction, chunk_size and shard set (world size, workers and batch "
                    "size may differ)"
                )
        same = state["layout"] == self.layout.as_dict()
        if same and state.get("deal", 1) == DEAL:
            self._epoch, self._base, self._k = int(state["epoch"]), merge(state["base"]), int(state["batches"])
        else:  # another layout, or dealt by another rule: the epoch's remaining positions dealt afresh
            self._epoch, self._base, self._k = int(state["epoch"]), merge(state["consumed"]), 0
        self._plan_cache = None
        bad = state.get("bad", {})
        if isinstance(bad, list):  # saved before the ids were keyed by rank: this rank's, or rank 0's after a resize
            bad = {str(self.rank if same else 0): bad}
        self._bad = {i for saver, iv in bad.items() if int(saver) % self.world_size == self.rank
                     for a, b in iv for i in range(int(a), int(b))}
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
            warn_once(f"latflip:{self.url}", "data.random_flip is not applied to the latent cache %s: its views (augment "
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
