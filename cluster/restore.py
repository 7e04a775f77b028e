"""Resume from a committed checkpoint (`cluster.checkpoint`): fetch per rank only what that rank
loads, check it, agree, load.

Resume fetches per rank only what that rank loads: `shared/`, its own `rank_%05d/` and, of each
engine folder, the files the strategy reads (`DeepSpeedStrategy.files_to_read`: this rank's ZeRO
partition and the small model metadata, never the other ranks' partitions). A checkpoint written
at another world size (a retry on a smaller or larger cluster) is re-partitioned: each engine from
the old shards overlapping this rank's new partition, a ZeRO-3 partitioned EMA from every old
rank's slice; every rank continues the data reader from rank 0's state (the reader's position must
not depend on the world size) with every old rank's unreadable-sample ids merged in
(`merged_reader_state`: each is then counted by one new rank), and ranks the old run did not have
take rank 0's method state and buffers and an RNG stream forked from rank 0's. `state.json`
records the world size.

Checking: before anything is loaded, every rank fetches all the files it reads and compares each
with the size and SHA-256 the commit marker lists (`_Fetched`; a file missing from storage counts
as damaged). Then the ranks agree (`integrity.agree`, one all-gather): when any rank found a
damaged file, rank 0 marks the checkpoint `BAD` (naming the files) and every rank raises
`DamagedCheckpoint`, with no state touched, so the caller takes the previous committed checkpoint
(`cluster.loop`). A marker without file checksums (written before they were recorded) loads
unchecked, as before, and the log says so.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Mapping

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from cluster.checkpoint import BAD, MARKER, CheckpointRef, CheckpointStore, TrainState, load_module_buffers, rank_dir, staging
from cluster.integrity import DamagedCheckpoint, Digest, agree, check
from system.config import ConfigError
from system.train_utils import EMA, restore_rng_state, seed_everything


def _torch_load(path: str) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _is_ema(rel: str) -> bool:
    return rel.rsplit("/", 1)[-1].startswith("ema_")


class _Fetched:
    """The files of checkpoint `ref` this rank reads, fetched into `local` on first use (a path
    relative to the checkpoint lands at the same path under `local`) and checked against the
    marker's sizes and checksums; a local copy goes once released."""

    def __init__(self, store: CheckpointStore, ref: CheckpointRef, local: str, rank: int):
        self.store, self.ref, self.local = store, ref, local
        try:
            files = (store.marker(ref.step) or {}).get("files")
            self.manifest = {rel: Digest.from_json(d) for rel, d in files.items()} if files is not None else None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DamagedCheckpoint(ref.url, MARKER, f"cannot be read ({type(e).__name__}: {e})") from None
        if self.manifest is None and rank == 0:
            print(f"[checkpoint] {ref.url} lists no file checksums (written before they were recorded): its files are "
                  "loaded unchecked", flush=True)

    def names(self, part: str) -> list[str]:
        """Paths (relative to the checkpoint) of the files under its folder `part`."""
        if self.manifest is None:
            return self.store.list_files(self.ref.step, part)
        return sorted(rel for rel in self.manifest if rel.startswith(f"{part}/"))

    def path(self, rel: str) -> str:
        """A checked local copy of file `rel` (`DamagedCheckpoint` when it differs from what was written)."""
        target = os.path.join(self.local, *rel.split("/"))
        if os.path.exists(target):
            return target
        if self.manifest is not None and rel not in self.manifest:
            raise FileNotFoundError(f"{self.ref.url}/{rel} is not part of the checkpoint")
        try:
            self.store.fetch(self.ref.step, rel, target)
        except FileNotFoundError:
            if self.manifest is None:
                raise
            raise DamagedCheckpoint(self.ref.url, rel, "is missing") from None
        if self.manifest is not None:
            try:
                check(target, self.manifest[rel], self.ref.url, rel)
            except DamagedCheckpoint:
                os.remove(target)
                raise
        return target

    def release(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.local, *rel.split("/")))


class _EngineFiles:
    """The files of engine folder `tag` of a checkpoint (`cluster.repartition.CheckpointFiles`)."""

    def __init__(self, fetched: _Fetched, tag: str):
        self.fetched, self.tag = fetched, tag
        self.names = [rel.split("/", 1)[1] for rel in fetched.names(tag)]
        self.where = f"{fetched.ref.url}/{tag}"

    def path(self, name: str) -> str:
        return self.fetched.path(f"{self.tag}/{name}")

    def release(self, name: str) -> None:
        self.fetched.release(f"{self.tag}/{name}")


def _read_meta(local: str, ref: CheckpointRef, engines: Mapping[str, Any]) -> dict:
    with open(os.path.join(local, "shared", "state.json")) as f:
        meta = json.load(f)
    missing = sorted(set(engines) - set(meta["engines"]))
    if missing:
        raise RuntimeError(f"checkpoint {ref.url} has no state for engine(s) {missing}; it holds {meta['engines']}")
    return meta


def _reads(fetched: _Fetched, meta: dict, strategy, engines: Mapping[str, Any], state: TrainState, *, rank: int,
           world_size: int) -> list[str]:
    """Every file this rank reads to restore from `fetched` besides `shared/state.json` (what the
    loading below asks `fetched` for)."""
    saved = int(meta["world_size"])
    same = saved == world_size
    src = rank if rank < saved else 0  # whose per-rank state this rank continues
    out = [rel for rel in fetched.names("shared") if not _is_ema(rel)]
    if rank == 0 and not state.ema_partitioned:  # a whole EMA is fetched by rank 0 alone and broadcast
        out += [rel for rel in fetched.names("shared") if rel in {f"shared/ema_{n}.safetensors" for n in state.emas}]
    out += [rel for rel in fetched.names(rank_dir(src)) if same or not (state.ema_partitioned and _is_ema(rel))]
    if not same and state.reader is not None:  # rank 0's data position, every old rank's unreadable samples
        out += [f"{rank_dir(k)}/reader.pt" for k in range(saved) if k != src]
    if not same and state.ema_partitioned:
        for name in sorted(set(state.emas) & set(engines)):
            out += [f"{rank_dir(k)}/ema_{name}.safetensors" for k in strategy.reshard_local_parts(engines[name], saved)]
    for tag, engine in engines.items():
        files = _EngineFiles(fetched, tag)
        names = strategy.files_to_read(engine, files, same) if hasattr(strategy, "files_to_read") else files.names
        out += [f"{tag}/{n}" for n in names]
    return out


def _fork_rng(rank: int) -> None:
    """A stream of its own for a rank the checkpoint had no RNG state for (after restoring rank 0's)."""
    seed_everything(int(torch.randint(0, 2**62, (1,)).item()) + 7919 * (rank + 1))


def _broadcast_ema(fetched: _Fetched, name: str, ema: EMA, *, rank: int, world_size: int) -> None:
    """Collective: a replicated EMA, fetched by rank 0 only and broadcast (not read from storage by
    every rank: it is as large as the module)."""
    present = None
    if rank == 0:
        try:
            ema.load_state_dict(load_file(fetched.path(f"shared/ema_{name}.safetensors")))
            present = True
        except FileNotFoundError:
            present = False
    if dist.is_initialized() and world_size > 1:
        box = [present]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            for key in sorted(ema.shadow):
                dist.broadcast(ema.shadow[key], src=0)


def _load_rank_state(fetched: _Fetched, meta: dict, strategy, engines: Mapping[str, Any], state: TrainState, *,
                     rank: int, world_size: int) -> None:
    """Collective: EMA, buffers, reader, method and RNG state of this rank from the checkpoint staged
    in `fetched`. At another world size: rank 0's reader state, rank `rank`'s other state if the old
    run had it, else rank 0's (and a forked RNG stream); a partitioned EMA is re-partitioned from the
    old ranks' slices that overlap this rank's."""
    ref, local = fetched.ref, fetched.local
    saved_world = int(meta["world_size"])
    same = saved_world == world_size
    src = rank if rank < saved_world else 0
    mine = os.path.join(local, rank_dir(src))
    saved_partitioned = bool(meta.get("ema_partitioned", state.ema_partitioned))
    if state.emas and saved_partitioned != state.ema_partitioned:
        raise ConfigError(f"config key 'deepspeed.zero_stage': checkpoint {ref.url} keeps its EMA "
                          f"{'partitioned (ZeRO-3)' if saved_partitioned else 'whole'} and this run "
                          f"{'partitioned' if state.ema_partitioned else 'whole'}: resume with the ZeRO stage it was "
                          f"written with (deepspeed.zero_stage={meta.get('zero_stage', '?')})")
    for name, ema in sorted(state.emas.items()):
        if not state.ema_partitioned:
            _broadcast_ema(fetched, name, ema, rank=rank, world_size=world_size)
        elif same:
            path = os.path.join(mine, f"ema_{name}.safetensors")
            if os.path.exists(path):
                ema.load_state_dict(load_file(path))
        else:
            if name not in engines:
                raise RuntimeError(f"checkpoint {ref.url}: EMA of {name!r} has no engine to re-partition it with")

            def part(k: int, name: str = name) -> dict:
                return load_file(fetched.path(f"{rank_dir(k)}/ema_{name}.safetensors"))

            ema.load_state_dict(strategy.reshard_local(engines[name], saved_world, part))
    if state.modules and os.path.exists(os.path.join(mine, "buffers.pt")):
        buffers = _torch_load(os.path.join(mine, "buffers.pt"))
        for name, module in state.modules.items():
            load_module_buffers(module, buffers.get(name, {}))
    if state.reader is not None:
        states = []
        for k in [rank] if same else range(saved_world):
            path = os.path.join(local, rank_dir(k), "reader.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"checkpoint {ref.url} has no data reader state for rank {k}")
            states.append(_torch_load(path))
        state.reader.load_state_dict(states[0] if same else merged_reader_state(states))
    if state.method is not None and os.path.exists(os.path.join(mine, "method.pt")):
        state.method.load_state_dict(_torch_load(os.path.join(mine, "method.pt")))
    restore_rng_state(_torch_load(os.path.join(mine, "rng.pt")))
    if src != rank:
        _fork_rng(rank)


def merged_reader_state(states: list[dict]) -> dict:
    """The reader state a rank of a resized run continues: old rank 0's (the position is the same on
    every rank), with the unreadable-sample ids of every old rank (`bad`: {saving rank: ids}, a
    list in states saved before they were keyed) merged, so each saving rank's ids are continued by
    exactly one new rank (system/data/stream.py) and `skipped` stays exact. A state without `bad`
    (another kind of source) is rank 0's as it is."""
    out = dict(states[0])
    if not all(isinstance(s, dict) and "bad" in s for s in states):
        return out
    bad: dict = {}
    for k, s in enumerate(states):
        ids = s["bad"]
        bad.update(ids if isinstance(ids, dict) else ({str(k): ids} if ids else {}))
    out["bad"] = bad
    return out


def _mark_bad(store: CheckpointStore, ref: CheckpointRef, damaged: list[tuple[int, str, str]]) -> None:
    """Rank 0: say which files of `ref` are damaged and mark it `BAD`, so it is never chosen again."""
    for r, file, reason in damaged:
        print(f"[checkpoint] {ref.url}: {file} {reason} (found by rank {r})", flush=True)
    store.mark_bad(ref.step, {file: reason for _, file, reason in damaged})
    print(f"[checkpoint] marked {ref.url} bad ({BAD}); resuming from the previous committed checkpoint", flush=True)


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
    fetching only what this rank loads; a checkpoint of another world size is re-partitioned.
    Raises `DamagedCheckpoint` on every rank, before anything is loaded, when any rank finds a
    file it reads damaged (`ref` is then marked bad); any other failure to fetch is raised on
    every rank too (no rank is left waiting in a collective)."""
    with staging(run_name, ref.step, rank, "load") as local:
        failure = None
        try:
            fetched = _Fetched(store, ref, local, rank)
            fetched.path("shared/state.json")
            meta = _read_meta(local, ref, engines)
            saved = int(meta["world_size"])
            same = saved == world_size
            if not same and not hasattr(strategy, "load_files"):
                raise RuntimeError(f"checkpoint {ref.url} was written by {saved} workers but this run has {world_size}, "
                                   f"and {type(strategy).__name__} cannot re-partition engine state")
            for rel in _reads(fetched, meta, strategy, engines, state, rank=rank, world_size=world_size):
                fetched.path(rel)
        except Exception as e:  # noqa: BLE001 - agreed on by all ranks, then raised on every rank
            failure = e
        agree(failure, rank, world_size, lambda damaged: _mark_bad(store, ref, damaged))
        if not same and rank == 0:
            print(f"[checkpoint] re-partitioning {ref.url} from {saved} to {world_size} workers", flush=True)
        for tag, engine in engines.items():
            files = _EngineFiles(fetched, tag)
            if hasattr(strategy, "load_files"):
                strategy.load_files(engine, files, same_world=same)
            else:
                for name in files.names:
                    files.path(name)
                strategy.load(engine, local, tag)
        _load_rank_state(fetched, meta, strategy, engines, state, rank=rank, world_size=world_size)
    state.step = int(meta["step"])
    return state
