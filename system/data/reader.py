"""Streaming, resumable reader of WebDataset shards: image shards (system/data/shards.py) and
token shards (system/data/tokens.py) share this machinery; a `SampleCodec` is all that differs.

Work is cut into units (a shard, or a sample range of one when there are fewer shards than
streams). There are `world_size * max(num_workers, 1)` streams; stream `rank * W + w` runs on
dataloader worker `w` of rank `rank`. Per epoch e the units are permuted with rng(seed, e) and
dealt round-robin to the streams; the samples of a unit are shuffled with rng(seed, e, unit).
A stream's position is (epoch, unit index in its epoch assignment, sample offset in the unit),
so `state_dict()` after any batch lets a fresh reader continue with exactly the batches an
uninterrupted run would have produced: each sample is seen once per epoch, across restarts.

`ShardReader` yields {"image", "label", "key"}; `TokenShardReader` yields {"codes", "label", "key"}.
"""
from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from system.config import DataConfig, StorageConfig, TokenDataConfig
from system.data.embedded import ensure_embedded_dataset
from system.data.source import BatchSource
from system.data.shards import IMAGE_FIELDS, image_complete, iter_tar_samples, read_index
from system.data.storage import StorageError, filesystem, join, storage_error
from system.data.tokens import decode_token_sample, meta_dtype, token_meta
from system.data.transforms import flip_decision, preprocess, to_tensor

log = logging.getLogger(__name__)

Pos = tuple[int, int, int]  # (epoch, unit index in the stream's epoch assignment, sample offset)


@dataclass(frozen=True)
class Unit:
    shard: str
    start: int  # sample range [start, end) in tar order
    end: int
    count: int  # samples in the whole shard


def build_units(shards: list[dict], num_streams: int, fraction: float = 1.0) -> list[Unit]:
    """Units of work: the first `fraction` of the samples (index order), whole shards, or
    sample-range slices of them when there are fewer shards than streams."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    total = sum(int(s["count"]) for s in shards)
    left = math.ceil(fraction * total)
    used: list[tuple[str, int, int]] = []
    for s in shards:
        if left <= 0:
            break
        n = min(int(s["count"]), left)
        if n > 0:
            used.append((s["name"], n, int(s["count"])))
        left -= n
    k = max(1, math.ceil(num_streams / max(len(used), 1)))
    units = []
    for name, n, count in used:
        bounds = [round(n * i / k) for i in range(k + 1)]
        units += [Unit(name, a, b, count) for a, b in zip(bounds, bounds[1:]) if b > a]
    if len(units) < num_streams:
        raise ValueError(
            f"{sum(u.end - u.start for u in units)} samples cannot feed {num_streams} streams "
            "(world_size * num_workers); use fewer workers or more data"
        )
    return units


def stream_units(num_units: int, num_streams: int, seed: int, epoch: int, stream: int) -> list[int]:
    """Unit ids that `stream` reads in `epoch`, in order."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_units)
    return [int(u) for u in perm[stream::num_streams]]


class SampleCodec:
    """What a reader does with one sample's tar members: `decode` -> (array, label) (raises on a
    corrupt sample, which is then skipped and counted); `collate` stacks arrays into the batch
    entry named `field`. Picklable (it travels to dataloader workers)."""

    field = "sample"

    def complete(self, fields: dict[str, bytes]) -> bool:
        raise NotImplementedError

    def decode(self, key: str, fields: dict[str, bytes], epoch: int) -> tuple[np.ndarray, int]:
        raise NotImplementedError

    def collate(self, arrays: list[np.ndarray]) -> torch.Tensor:
        raise NotImplementedError


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
        flip = self.random_flip and flip_decision(self.seed, epoch, key)
        return preprocess(img, self.resolution, flip), int(fields["cls"])

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


@dataclass
class _Spec:
    url: str
    storage: StorageConfig
    units: list[Unit]
    num_streams: int
    seed: int
    batch_size: int
    codec: SampleCodec
    drop_last: bool


class _Stream:
    """One stream's batches from position `pos` on, forever (runs in a worker or in-process)."""

    def __init__(self, spec: _Spec, stream: int, pos: Pos, skipped: int):
        self.spec, self.stream, self.pos, self.skipped = spec, stream, tuple(pos), skipped

    def _load(self, unit: Unit) -> tuple[list[tuple[str, dict]], bool]:
        url = join(self.spec.url, unit.shard)
        try:
            fs, path = filesystem(url, self.spec.storage)
            if unit.start == 0 and unit.end == unit.count:
                f = io.BytesIO(fs.cat_file(path))
            else:
                f = fs.open(path, "rb", block_size=16 << 20)
        except FileNotFoundError:
            raise FileNotFoundError(f"shard listed in the index is missing: {url}") from None
        except Exception as e:  # noqa: BLE001
            raise storage_error(url, self.spec.storage, e) from e
        samples, n = [], 0  # n: complete samples read from the start of the tar
        try:
            for key, fields in iter_tar_samples(f, url, self.spec.codec.complete):
                if fields is None or n >= unit.end:
                    break
                if n >= unit.start:
                    samples.append((key, fields))
                n += 1
        except (StorageError, FileNotFoundError):
            raise
        except OSError as e:
            raise storage_error(url, self.spec.storage, e) from e
        finally:
            f.close()
        truncated = n < unit.end  # the index promised more samples than the tar holds
        if truncated:
            log.warning("shard %s is truncated: %d of %d samples readable; skipping the rest", url, n, unit.count)
        return samples, truncated

    def _decode(self, unit: Unit, key: str, fields: dict, epoch: int) -> tuple[np.ndarray, int] | None:
        codec = self.spec.codec
        url = join(self.spec.url, unit.shard)
        if not codec.complete(fields):
            log.warning("skipping incomplete sample %r in %s (fields: %s)", key, url, sorted(fields))
            return None
        try:
            return codec.decode(key, fields, epoch)
        except Exception as e:  # noqa: BLE001 - any decode failure skips the sample
            log.warning("skipping corrupt %s %r in %s: %s: %s", codec.field, key, url, type(e).__name__, e)
            return None

    def samples(self) -> Iterator[tuple[tuple[np.ndarray, int, str] | None, int, Pos]]:
        """(decoded (image, label, key) or None if skipped, epoch, position after it)."""
        sp = self.spec
        epoch, u, off = self.pos
        while True:
            mine = stream_units(len(sp.units), sp.num_streams, sp.seed, epoch, self.stream)
            found = u > 0 or off > 0
            while u < len(mine):
                unit = sp.units[mine[u]]
                samples, truncated = self._load(unit)
                found = found or bool(samples)
                if truncated and off == 0:  # counted once, when the unit is entered
                    self.skipped += 1
                order = np.random.default_rng([sp.seed, epoch, mine[u]]).permutation(len(samples))
                for i in range(off, len(samples)):
                    key, fields = samples[order[i]]
                    nxt = (epoch, u, i + 1) if i + 1 < len(samples) else (epoch, u + 1, 0)
                    if nxt[1] == len(mine):
                        nxt = (epoch + 1, 0, 0)
                    out = self._decode(unit, key, fields, epoch)
                    if out is None:
                        self.skipped += 1
                    yield (None if out is None else (*out, key)), epoch, nxt
                u, off = u + 1, 0
            if not found:  # would spin forever without producing a batch
                shards = sorted({sp.units[i].shard for i in mine})
                raise RuntimeError(f"no readable samples in {sp.url} shards {shards} (all truncated or empty)")
            epoch, u, off = epoch + 1, 0, 0

    def batches(self) -> Iterator[dict[str, Any]]:
        sp = self.spec
        arrays, labels, keys, first_epoch = [], [], [], None
        for item, epoch, nxt in self.samples():
            if item is not None:
                if not arrays:
                    first_epoch = epoch
                arrays.append(item[0])
                labels.append(item[1])
                keys.append(item[2])
            epoch_ends = not sp.drop_last and nxt[0] != first_epoch
            if arrays and (len(arrays) == sp.batch_size or epoch_ends):
                yield {
                    sp.codec.field: sp.codec.collate(arrays),
                    "label": torch.tensor(labels, dtype=torch.long),
                    "key": keys,
                    "_stream": self.stream,
                    "_pos": list(nxt),
                    "_skipped": self.skipped,
                    "_epoch": first_epoch,
                }
                arrays, labels, keys = [], [], []


class _StreamDataset(IterableDataset):
    def __init__(self, spec: _Spec, worker_streams: list[int], starts: dict[int, Pos], skipped: dict[int, int]):
        self.spec, self.worker_streams, self.starts, self.skipped = spec, worker_streams, starts, skipped

    def __iter__(self):
        info = get_worker_info()
        s = self.worker_streams[info.id if info is not None else 0]
        return _Stream(self.spec, s, self.starts[s], self.skipped[s]).batches()


class ShardSource(BatchSource):
    """Infinite iterable of one rank's batches {<codec.field>: (B, ...), "label": long (B,),
    "key": list[str]} from a shard set; `codec(index)` says how samples decode. `drop_last=True`:
    every batch has `batch_size` samples (a stream's batches run on across epoch ends, nothing is
    dropped); False: a stream's last batch of an epoch may be short, so no batch mixes epochs.
    `skipped` counts corrupt samples and truncated shards; `epoch` is the epoch of the last
    batch's first sample."""

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
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size <= 0 or num_workers < 0:
            raise ValueError(f"need batch_size > 0, num_workers >= 0; got {batch_size}, {num_workers}")
        storage = storage or StorageConfig()
        self.url, self.rank, self.world_size, self.num_workers = url.rstrip("/"), rank, world_size, num_workers
        self.seed, self.fraction = seed, fraction
        self.index = read_index(self.url, storage)  # early: unreachable endpoint / bad credentials
        sample_codec = codec(self.index)
        self._check_shards(storage)
        self.classes: dict[str, int] = dict(self.index["classes"])
        self.streams_per_rank = max(num_workers, 1)
        num_streams = world_size * self.streams_per_rank
        units = build_units(self.index["shards"], num_streams, fraction)
        self.num_samples = sum(u.end - u.start for u in units)
        self._spec = _Spec(self.url, storage, units, num_streams, seed, batch_size, sample_codec, drop_last)
        self._my_streams = [rank * self.streams_per_rank + w for w in range(self.streams_per_rank)]
        self._positions: dict[int, Pos] = {s: (0, 0, 0) for s in self._my_streams}
        self._skipped: dict[int, int] = {s: 0 for s in self._my_streams}
        self._next = self._my_streams[0]
        self.epoch = 0

    def _check_shards(self, storage: StorageConfig) -> None:
        try:
            fs, root = filesystem(self.url, storage)
            present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
        except Exception as e:  # noqa: BLE001
            raise storage_error(self.url, storage, e) from e
        missing = [s["name"] for s in self.index["shards"] if s["name"] not in present]
        if missing:
            urls = ", ".join(join(self.url, m) for m in missing[:5])
            raise FileNotFoundError(f"{len(missing)} shard(s) listed in {join(self.url, 'index.json')} are missing: {urls}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def skipped(self) -> int:
        return sum(self._skipped.values())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        base = self.rank * self.streams_per_rank
        rot = self._next - base
        worker_streams = [base + (rot + w) % self.streams_per_rank for w in range(self.streams_per_rank)]
        ds = _StreamDataset(self._spec, worker_streams, dict(self._positions), dict(self._skipped))
        it = iter(ds) if self.num_workers == 0 else DataLoader(ds, batch_size=None, num_workers=self.num_workers, in_order=True)
        for batch in it:
            s = batch.pop("_stream")
            if s != self._next:
                raise RuntimeError(f"data stream order broken: expected a batch of stream {self._next}, got {s}")
            self._positions[s] = tuple(int(x) for x in batch.pop("_pos"))
            self._skipped[s] = int(batch.pop("_skipped"))
            self.epoch = int(batch.pop("_epoch"))
            self._next = base + (s - base + 1) % self.streams_per_rank
            yield batch

    def one_epoch(self) -> Iterator[dict[str, Any]]:
        """This rank's batches of the current epoch, then stop (for validation; with
        drop_last=False every sample of the rank's share comes exactly once)."""
        start = min(p[0] for p in self._positions.values())
        if all(p[0] > start for p in self._positions.values()):
            return
        for batch in self:
            if self.epoch == start:
                yield batch
            if all(p[0] > start for p in self._positions.values()):
                return

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed out (small; JSON-friendly apart from int keys)."""
        return {
            "positions": {s: list(p) for s, p in self._positions.items()},
            "skipped": dict(self._skipped),
            "next_stream": self._next,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "fraction": self.fraction,
            "num_samples": self.num_samples,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (taken on the same rank with the same data layout)."""
        for k in ("seed", "world_size", "num_workers", "fraction", "num_samples"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(
                    f"data reader state was saved with {k}={state[k]} but this reader has {k}={getattr(self, k)}; "
                    "exact resume needs the same seed, world_size, num_workers, fraction and shard set"
                )
        positions = {int(s): tuple(int(x) for x in p) for s, p in state["positions"].items()}
        if sorted(positions) != self._my_streams:
            raise ValueError(
                f"data reader state holds streams {sorted(positions)} but rank {self.rank} runs {self._my_streams}; "
                "load the state saved by the same rank"
            )
        self._positions = positions
        self._skipped = {int(s): int(v) for s, v in state.get("skipped", {}).items()} or {s: 0 for s in positions}
        self._next = int(state["next_stream"])
        self.epoch = int(state.get("epoch", 0))


def _config_url(data: DataConfig | TokenDataConfig, val: bool) -> str:
    url = data.val_url if val else data.url
    if not url:
        raise ValueError("data.val_url is not set (needed for validation)" if val else "data.url is not set")
    return url


class ShardReader(ShardSource):
    """Batches {"image": float (B, 3, R, R) in [-1, 1], "label": long (B,), "key": list[str]} of
    an image shard set (center crop to `resolution`, seeded per-sample flips)."""

    def __init__(self, url: str, *, resolution: int, seed: int = 0, random_flip: bool = True, **kwargs: Any):
        if resolution <= 0:
            raise ValueError(f"need resolution > 0, got {resolution}")
        super().__init__(url, lambda index: ImageCodec(resolution, random_flip, seed), seed=seed, **kwargs)

    @classmethod
    def from_config(cls, data: DataConfig, *, rank: int, world_size: int, seed: int, val: bool = False) -> "ShardReader":
        """Reader for `data.url` (or `data.val_url` with val=True: no flips, short last batches);
        builds the embedded photo set there first when `data.embedded` is set."""
        url = _config_url(data, val)
        if data.embedded:
            ensure_embedded_dataset(url, data.storage, split="val" if val else "train")
        return cls(
            url, rank=rank, world_size=world_size, batch_size=data.batch_size, resolution=data.resolution,
            num_workers=data.num_workers, seed=seed, random_flip=data.random_flip and not val,
            fraction=1.0 if val else data.fraction, storage=data.storage, drop_last=not val,
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
                    val: bool = False) -> "TokenShardReader":
        """Reader for `data.url` (or `data.val_url` with val=True: short last batches)."""
        return cls(
            _config_url(data, val), rank=rank, world_size=world_size, batch_size=data.batch_size,
            num_workers=data.num_workers, seed=seed, fraction=1.0 if val else data.fraction, storage=data.storage,
            drop_last=not val,
        )
