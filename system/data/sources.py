"""What a method trains on, declared through the method registry (`register(..., source=...)`):
a `SourceFactory` that checks and describes the data before any resource is taken (`check`,
`resolve` -> `DataSpec`) and builds each rank's `BatchSource` (and, optionally, its share of a
validation split) inside the rank loop.

Built in: `ImageShards` (image shard sets, or a latent cache of them: system/data/latents.py),
`TokenShards` (token shard sets written by pre-tokenization). Sources whose batches other workers
make (rollouts) subclass `ActorFedSource`: cluster/ binds them to an actor pool.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch

from system.data.source import BatchSource


@dataclass(frozen=True)
class TokenSpec:
    """A token shard set's codes (its index's `tokens` section)."""

    seq_len: int  # codes per view (prefix tokens included)
    vocab_size: int
    dtype: str = "uint16"
    augment: str = "none"
    tokenizer: dict = field(default_factory=dict)  # {"kind", "fingerprint", ...} of the tokenizer that wrote them

    @classmethod
    def from_section(cls, meta: dict) -> "TokenSpec":
        return cls(seq_len=int(meta["seq_len"]), vocab_size=int(meta["vocab_size"]), dtype=str(meta.get("dtype", "uint16")),
                   augment=str(meta.get("augment", "none")), tokenizer=dict(meta.get("tokenizer") or {}))


@dataclass(frozen=True)
class LatentSpec:
    """A latent cache's latents (its index's `latents` section)."""

    channels: int
    size: int  # latent side
    resolution: int  # pixels encoded
    augment: str = "flip"
    vae: dict = field(default_factory=dict)  # {"fingerprint", "config", "source"} of the VAE that wrote them

    @classmethod
    def from_section(cls, meta: dict) -> "LatentSpec":
        return cls(channels=int(meta["channels"]), size=int(meta["size"]), resolution=int(meta["resolution"]),
                   augment=str(meta.get("augment", "flip")), vae=dict(meta.get("vae") or {}))


@dataclass(frozen=True)
class DataSpec:
    """What a method may know about its data, resolved once by the driver (from the index), or by a
    pipeline's wiring from the step before (a dry run reads no data)."""

    resolution: int = 0  # image side in pixels (0: not an image source)
    num_classes: int = 0
    storage: Any = None  # StorageConfig for the data's (and a method's input exports') object store
    tokens: Optional[TokenSpec] = None  # token shards
    latents: Optional[LatentSpec] = None  # a latent cache (image shards with each view's VAE latents)


@dataclass
class SourceContext:
    """What a batch-source factory gets on each rank (from the rank loop)."""

    rank: int
    world_size: int
    device: torch.device
    seed: int
    max_steps: int
    collective: Any  # system.methods.base.Collective
    # collective: the full weights of a trained module as CPU tensors on rank 0 ({} elsewhere)
    module_state: Callable[[str], dict]
    step: Callable[[], int]  # the loop's current step (updates done so far)


@runtime_checkable
class SourceFactory(Protocol):
    """How a method's data is checked, described and read. Picklable (it travels to every rank)."""

    def check(self, exp: Any) -> None:
        """ConfigError naming the key when the data cannot be read (before Ray starts)."""

    def resolve(self, exp: Any) -> DataSpec:
        """The driver's one look at the data (its index)."""

    def __call__(self, exp: Any, ctx: SourceContext) -> BatchSource:
        """This rank's training batches."""

    def validation(self, exp: Any, ctx: SourceContext) -> Optional[BatchSource]:
        """This rank's share of the validation split (None: the job has none)."""


def _check_set(url: str, key: str, storage: Any, forbid: tuple[str, ...], need: Optional[str] = None) -> dict:
    from system.config import ConfigError
    from system.data.shards import check_shard_set

    index = check_shard_set(url, key, storage)
    for kind in forbid:
        if kind in index:
            raise ConfigError(f"config key '{key}' = {url!r} holds {kind[:-1]} shards; point it at "
                              + ("a token shard set (jobs/pretokenize.py)" if need == "tokens" else "image shards"))
    if need and need not in index:
        raise ConfigError(f"config key '{key}' = {url!r} is not a token shard set (no tokens section in its index): "
                          "write one with jobs/pretokenize.py")
    return index


def _check_size(index: dict, exp: Any, key: str, readers: Optional[int] = None) -> None:
    """The samples the reader will use of the set at `key` (its index's counts, `data.fraction` for
    training) give each of the `readers` ranks reading it (default `cluster.num_workers`) one batch
    of `data.batch_size` (training, whole batches only) or one sample (validation): a ConfigError
    naming the key otherwise, before any rank starts (the reader on the ranks would refuse it there)."""
    from system.config import ConfigError
    from system.data.plan import build_chunks

    d = exp.data
    world = readers or int(getattr(getattr(exp, "cluster", None), "num_workers", 1))
    val = key == "data.val_url"
    fraction = 1.0 if val else d.fraction
    if index.get("planned"):  # a dry run's stand-in (system/pipelines/dry_run.py): counts, no shards
        n = int(index["num_samples"] * fraction)
    else:
        n = sum(c.size for c in build_chunks(index["shards"], fraction=fraction)[1])
    url = d.val_url if val else d.url
    held = f"{key} = {url!r} holds {n} sample(s)" + ("" if fraction == 1.0 else f" at data.fraction={fraction}")
    if val and n < world:
        raise ConfigError(f"config key 'cluster.num_workers' = {world}: {held}, fewer than one for each rank; use "
                          f"cluster.num_workers <= {n} or a larger validation set")
    if not val and n < world * d.batch_size:
        fits = n // world
        fix = (f"use data.batch_size <= {fits}" if fits else f"use cluster.num_workers <= {n} and data.batch_size=1")
        raise ConfigError(f"config key 'data.batch_size' = {d.batch_size}: {held}, fewer than one batch for each of "
                          f"cluster.num_workers={world} rank(s) ({world} x {d.batch_size} = {world * d.batch_size}); "
                          f"{fix}, or more data")


class ImageShards:
    """Image shard sets (`data`: DataConfig): `ShardReader` per rank; `data.url` may also be a latent
    cache of an image shard set (its batches carry the cached "latents" too). `readers`: how many
    ranks read the training batches (None: every rank of `cluster.num_workers`; 1 for a source whose
    rank 0 reads the images of the whole pool)."""

    readers: Optional[int] = None

    def __init__(self, readers: Optional[int] = None):
        self.readers = readers

    def check(self, exp: Any) -> None:
        d = exp.data
        _check_size(_check_set(d.url, "data.url", d.storage, ("tokens",)), exp, "data.url", self.readers)
        if d.val_url:
            _check_size(_check_set(d.val_url, "data.val_url", d.storage, ("tokens",)), exp, "data.val_url", self.readers)

    def resolve(self, exp: Any) -> DataSpec:
        from system.data.shards import read_index

        index = read_index(exp.data.url, exp.data.storage)
        latents = LatentSpec.from_section(index["latents"]) if isinstance(index.get("latents"), dict) else None
        return DataSpec(exp.data.resolution, len(index["classes"]), exp.data.storage, latents=latents)

    def _reader(self):
        from system.data.stream import ShardReader

        return ShardReader

    def __call__(self, exp: Any, ctx: SourceContext) -> BatchSource:
        return self._reader().from_config(exp.data, rank=ctx.rank, world_size=ctx.world_size, seed=exp.seed,
                                          pin_memory=ctx.device.type == "cuda")

    def validation(self, exp: Any, ctx: SourceContext) -> Optional[BatchSource]:
        if not exp.data.val_url:
            return None
        return self._reader().from_config(exp.data, rank=ctx.rank, world_size=ctx.world_size, seed=exp.seed, val=True)


class TokenShards(ImageShards):
    """Token shard sets (`data`: TokenDataConfig) written by pre-tokenization: `TokenShardReader` per
    rank; `resolve` reads the codes' description (`DataSpec.tokens`) from the index(es)."""

    def check(self, exp: Any) -> None:
        from system.data.shards import read_index

        self.resolve(exp)
        for key, url in (("data.url", exp.data.url), ("data.val_url", exp.data.val_url)):
            if url:
                _check_size(read_index(url, exp.data.storage), exp, key, self.readers)

    def resolve(self, exp: Any) -> DataSpec:
        from system.config import ConfigError
        from system.data.shards import read_index
        from system.data.storage import StorageError
        from system.data.tokens import token_meta

        d = exp.data
        out: Optional[DataSpec] = None
        for key, url in (("data.url", d.url), ("data.val_url", d.val_url)):
            if not url:
                continue
            try:
                index = read_index(url, d.storage)
                tokens = TokenSpec.from_section(token_meta(index, url))
            except (FileNotFoundError, StorageError, ValueError, OSError) as e:
                raise ConfigError(f"config key '{key}' = {url!r}: {e}. Point it at a token shard set written by "
                                  "jobs/pretokenize.py (a folder or s3://bucket/prefix holding index.json)") from None
            if out is None:
                out = DataSpec(resolution=0, num_classes=len(index["classes"]), storage=d.storage, tokens=tokens)
            elif (tokens.seq_len, tokens.vocab_size) != (out.tokens.seq_len, out.tokens.vocab_size):
                raise ConfigError(f"config key 'data.val_url' = {url!r}: its tokens (seq_len {tokens.seq_len}, vocab "
                                  f"{tokens.vocab_size}) differ from data.url's ({out.tokens.seq_len}, "
                                  f"{out.tokens.vocab_size}): pre-tokenize both with the same tokenizer")
        return out

    def _reader(self):
        from system.data.stream import TokenShardReader

        return TokenShardReader

    def __call__(self, exp: Any, ctx: SourceContext) -> BatchSource:
        return self._reader().from_config(exp.data, rank=ctx.rank, world_size=ctx.world_size, seed=exp.seed,
                                          pin_memory=ctx.device.type == "cuda")


@dataclass(frozen=True)
class ActorSpec:
    """The actors an actor-fed source needs: how many, each one's resources, Ray restarts in place."""

    num_actors: int
    cpus: float = 1.0
    gpus: float = 0.0
    max_restarts: int = 0


@runtime_checkable
class Feeder(Protocol):
    """Rank 0's side of an actor-fed source (it reads the input of every step for the whole pool)."""

    def items(self, step: int) -> list[tuple]:
        """The work items of `step` (reads its input): each the argument tuple of the worker's `run`."""

    def combine(self, step: int, results: list, timing: dict[str, float]) -> Any:
        """Step `step`'s whole batch from its items' results (in item order); `timing` (seconds,
        staleness, re-issues: from cluster/) goes into the batch's statistics."""

    def state_dict(self) -> dict:
        """Its position after the last combined step (a resumed run continues there)."""

    def load_state_dict(self, state: dict) -> None: ...

    def summary(self) -> dict:
        """What the run's metrics.json keeps under "source" (its numbers reach the run's report)."""


class ActorFedSource:
    """Base class of sources whose batches remote workers make (e.g. rollouts of a policy): cluster/
    starts an actor pool for them before the training pool (cluster/rollout_pool.py) and hands
    every rank a bound factory. A subclass describes the work; it is not itself callable on a rank.

    Each actor holds the plain worker `worker(exp, fault_dir)()` builds; each step, the learner's
    module `publish_module` is published and every actor loads it before its next item
    (`load_weights(state_dict)`), rank 0's `feeder` splits the step's input into items
    (`run(*item) -> (result, timings)` on the actors), combines their results into the batch, and
    `shares` cuts it for the learner ranks. An optional probe (`probe_name`) measures the weights
    before training (fresh runs, kept in `<run>/<probe_file>`) and after it (the export) with the
    workers' `probe(*probe_input(exp))`; the run's metrics get `<probe_name>_start` / `_end`."""

    publish_module: str = "policy"
    probe_name: Optional[str] = None
    probe_file: str = "probe.json"

    def check(self, exp: Any) -> None:
        raise NotImplementedError

    def resolve(self, exp: Any) -> DataSpec:
        raise NotImplementedError

    def actors(self, exp: Any) -> ActorSpec:
        raise NotImplementedError

    def worker(self, exp: Any, fault_dir: Optional[str] = None) -> Callable[[], Any]:
        """A picklable factory of the plain worker each actor holds (`fault_dir`: a local folder for
        once-per-run fault-injection markers, or None)."""
        raise NotImplementedError

    def feeder(self, exp: Any) -> Feeder:
        raise NotImplementedError

    def shares(self, batch: Any, world_size: int) -> list:
        """`batch` cut into one share per learner rank."""
        raise NotImplementedError

    def overlap(self, exp: Any) -> bool:
        """Submit step k+1's items before step k's update (off-policy by one version) instead of
        after it."""
        return False

    def micro_batch_size(self, exp: Any) -> int:
        """One learner rank's share of a step's batch (DeepSpeed's bookkeeping)."""
        return exp.data.batch_size // exp.cluster.num_workers

    def probe_input(self, exp: Any) -> Optional[tuple]:
        """The arguments of the workers' `probe` (None: no probe for this run)."""
        return None

    def start_weights(self, exp: Any) -> dict:
        """`publish_module`'s weights before training (the probe's baseline)."""
        raise NotImplementedError

    def final_weights(self, exp: Any, export_url: str) -> dict:
        """`publish_module`'s trained weights, read from the run's export."""
        raise NotImplementedError

    def __call__(self, exp: Any, ctx: SourceContext) -> BatchSource:
        raise TypeError(f"{type(self).__name__} makes its batches on an actor pool: cluster/ binds it before training")

    def validation(self, exp: Any, ctx: SourceContext) -> Optional[BatchSource]:
        return None
