"""Sources whose batches an actor pool makes (`system.data.sources.ActorFedSource`, e.g. rollouts
of the policy being trained) bound to Ray: the actor pool, the weight publisher, and the batch
source that feeds the one rank loop.

- `WeightPublisher`: how the learner's weights reach the actors (object store today).
- `WeightFollower` (the actor body around the source's plain worker): loads the published weights
  of a newer version before it runs an item.
- `FedPool` (driver side): the source's actors in one placement group on the actor pool
  (cluster/actor_pool.py, `FailurePolicy.fail_fast`: a dead actor's item is re-issued unchanged,
  same seed, to the restarted actor or another; an item's error ends the run). Created by the
  driver, so the actors outlive learner restarts; `bind(job)` hands every rank a `BoundSource`.
- `FedSource`: the learner's `BatchSource`. Every step, on all ranks:

      all:    publish `publish_module` (gathered first under ZeRO-3); rank 0 puts it in the object store
      rank 0: [in step] submit step k's items (the feeder's) with those weights; gather
              [`overlap`] gather step k (submitted one step earlier), submit k+1 (one version stale)
              the feeder combines the results into the whole batch (+ its statistics)
      rank 0 -> all: scatter (the source's `shares`)
      all:    the loop runs the method's step, commits, exports

A lost learner rank takes the pool down; Ray Train restarts it (`cluster.max_failures`) and every
rank resumes from the newest committed checkpoint (weights, optimizer, the feeder's position). In
step, the resumed run repeats exactly what the lost one did; with `overlap`, the first resumed step
submits with the checkpoint's weights where the lost session used the ones before them (one
version fresher), so from there the two runs can differ.
"""
from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import ray
import torch
import torch.distributed as dist

from cluster.actor_pool import ActorPool, FailurePolicy
from system.config import Experiment
from system.data.source import BatchSource
from system.data.sources import ActorFedSource, DataSpec, SourceContext


# ---------------------------------------------------------------------------- weight publication
class WeightPublisher:
    """How the learner's weights reach the actors. `publish` runs in the learner and returns a
    small handle; `fetch` runs in an actor. A GPU collective broadcast fits the same API."""

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> Any:
        raise NotImplementedError

    def fetch(self, handle: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class ObjectStorePublisher(WeightPublisher):
    """The state dict packed into one flat byte buffer and `ray.put` once; each actor `ray.get`s it
    (a read-only view on the node's shared memory, no deserialisation copy) and loads views of it.
    One large buffer instead of a pickle of many tensors: ~5x faster for a few MB of weights."""

    ALIGN = 64  # bytes

    def __init__(self) -> None:
        self._buf: Optional[torch.Tensor] = None  # reused staging buffer (a fresh one costs page faults)

    def publish(self, state_dict, version):
        meta, chunks, offset = [], [], 0
        for name, t in state_dict.items():
            flat = t.detach().cpu().contiguous().reshape(-1)
            n = flat.numel() * flat.element_size()
            offset = -(-offset // self.ALIGN) * self.ALIGN  # every tensor starts aligned for its dtype
            meta.append((name, t.dtype, tuple(t.shape), offset, n))
            chunks.append(flat.view(torch.uint8) if n else None)
            offset += n
        if self._buf is None or self._buf.numel() != offset:
            self._buf = torch.empty(offset, dtype=torch.uint8)
        for (_, _, _, off, n), c in zip(meta, chunks):
            if n:
                self._buf[off:off + n].copy_(c)
        # ray.put copies into the object store, so the buffer is free again on return. The ref is
        # wrapped in a list: Ray must not resolve it before the actor times its own fetch.
        return [ray.put({"version": version, "meta": meta, "buf": self._buf.numpy()})]

    def fetch(self, handle):
        import warnings

        obj = ray.get(handle[0])
        with warnings.catch_warnings():  # the buffer is read-only shared memory; we only read it
            warnings.simplefilter("ignore", UserWarning)
            buf = torch.from_numpy(obj["buf"])
        return {name: buf[off:off + n].view(dtype).view(shape) for name, dtype, shape, off, n in obj["meta"]}


class WeightFollower:
    """An actor's body: the source's plain worker (`load_weights`, `run`, `probe`) plus the weight
    version it holds; every call names the version it needs and where to fetch it."""

    def __init__(self, factory: Any, publisher: WeightPublisher):
        self.worker, self.publisher, self.version = factory(), publisher, -1
        self.device = getattr(self.worker, "device", "cpu")

    def _sync(self, version: int, handle: Any) -> float:
        """Load the published weights of `version` unless already held; seconds spent."""
        if version == self.version:
            return 0.0
        t = time.perf_counter()
        self.worker.load_weights(self.publisher.fetch(handle))
        self.version = version
        return time.perf_counter() - t

    def run(self, version: int, handle: Any, *item: Any) -> tuple[Any, dict]:
        sync = self._sync(version, handle)
        result, timings = self.worker.run(*item)
        return result, {"sync_s": sync, **timings, "version": self.version}

    def probe(self, version: int, handle: Any, *args: Any) -> Any:
        self._sync(version, handle)
        return self.worker.probe(*args)


# ---------------------------------------------------------------------------- the learner's batch source
def _scatter(batch: Any, source: ActorFedSource, ctx: SourceContext) -> Any:
    """Rank 0's whole batch cut by the source (`shares`); each rank gets its share."""
    if ctx.world_size == 1:
        return batch
    shares = source.shares(batch, ctx.world_size) if ctx.rank == 0 else None
    box: list = [None]
    dist.scatter_object_list(box, shares, src=0)
    return box[0]


class FedSource(BatchSource):
    """The learner's batch source for an actor-fed source: each `next` publishes the current
    weights, gets step k's batch from the pool (rank 0) and scatters it. Rank 0's state (the
    feeder's, and the items re-issued so far) goes into the checkpoint."""

    def __init__(self, source: ActorFedSource, exp: Experiment, ctx: SourceContext, pool: ActorPool,
                 publisher: WeightPublisher):
        self.source, self.exp, self.ctx, self.pool, self.publisher = source, exp, ctx, pool, publisher
        self.rank0 = ctx.rank == 0
        self.feeder = source.feeder(exp) if self.rank0 else None
        self.pending: Optional[dict] = None
        self.reissued_before = 0
        self.t_last: Optional[float] = None
        self.t_returned: Optional[float] = None

    def _submit(self, s: int, version: int, handle: Any, publish_s: float) -> dict:
        items = [(version, handle, *item) for item in self.feeder.items(s)]
        return {"version": version, "items": self.pool.submit(items, "run"), "t_submit": time.perf_counter(),
                "publish_s": publish_s}

    @property
    def reissued(self) -> int:
        return self.reissued_before + self.pool.stats.reissued

    def __iter__(self):
        while True:
            yield self._next()

    def _next(self) -> Any:
        s, t0 = self.ctx.step(), time.perf_counter()
        sd = self.ctx.module_state(self.source.publish_module)  # collective (ZeRO-3 gathers); {} on ranks > 0
        handle = self.publisher.publish(sd, s) if self.rank0 else None
        publish_s = time.perf_counter() - t0
        batch = None
        if self.rank0:
            if self.pending is None:
                self.pending = self._submit(s, s, handle, publish_s)
            pending = self.pending
            t1 = time.perf_counter()
            out = self.pool.gather(pending["items"])
            t_done = time.perf_counter()
            timings = [t for _, t in out]
            timing = {
                "staleness": float(s - pending["version"]), "publish_s": publish_s, "rollout_wait_s": t_done - t1,
                "rollout_wall_s": t_done - pending["t_submit"],
                # publish of the version these items used + the slowest actor's fetch and load
                "weight_sync_s": pending["publish_s"] + max(t["sync_s"] for t in timings),
                # the slowest actor's share of each phase the worker timed
                **{k: max(t.get(k, 0.0) for t in timings) for k in sorted({k for t in timings for k in t})
                   if k.endswith("_s") and k != "sync_s"},
                # the previous step (this source sees the loop only between its calls): its wall time,
                # and the part of it outside the source (the learner's update, commit, logging)
                "iter_s": t0 - self.t_last if self.t_last is not None else 0.0,
                "update_wall_s": t0 - self.t_returned if self.t_returned is not None else 0.0,
                "rollout_reissued": float(self.reissued)}
            batch = self.feeder.combine(s, [r for r, _ in out], timing)
            ahead = self.source.overlap(self.exp) and s + 1 < self.exp.train.max_steps
            self.pending = self._submit(s + 1, s, handle, publish_s) if ahead else None
        self.t_last = t0
        out_batch = _scatter(batch, self.source, self.ctx)
        self.t_returned = time.perf_counter()
        return out_batch

    def state_dict(self) -> dict:
        if not self.rank0:
            return {}
        return {**self.feeder.state_dict(), "rollout_reissued": self.reissued}

    def load_state_dict(self, state: dict) -> None:
        if self.rank0 and state:
            self.feeder.load_state_dict(state)
            self.reissued_before = int(state.get("rollout_reissued", 0))

    def summary(self) -> dict:
        return {"source": {**self.feeder.summary(), "rollout_reissued": self.reissued}} if self.rank0 else {}


@dataclass
class BoundSource:
    """An actor-fed source bound to its pool: the picklable batch-source factory every rank gets."""

    source: ActorFedSource
    pool: ActorPool
    publisher: WeightPublisher

    def check(self, exp: Experiment) -> None:
        self.source.check(exp)

    def resolve(self, exp: Experiment) -> DataSpec:
        return self.source.resolve(exp)

    def __call__(self, exp: Experiment, ctx: SourceContext) -> FedSource:
        return FedSource(self.source, exp, ctx, self.pool, self.publisher)

    def validation(self, exp: Experiment, ctx: SourceContext) -> Optional[BatchSource]:
        return self.source.validation(exp, ctx)


# ---------------------------------------------------------------------------- the driver's side
class FedPool:
    """The driver's side of an actor-fed run: the source's actors (one placement group, restarted
    in place by Ray), their probe, and the binding handed to the training pool."""

    def __init__(self, exp: Experiment, source: ActorFedSource, fault_dir: Optional[str] = None):
        spec = source.actors(exp)
        self.exp, self.source, self.publisher = exp, source, ObjectStorePublisher()
        factory = functools.partial(WeightFollower, source.worker(exp, fault_dir), self.publisher)
        self.pool = ActorPool(factory, spec.num_actors, num_cpus=spec.cpus, num_gpus=spec.gpus, placement_group=True,
                              policy=FailurePolicy.fail_fast(spec.max_restarts), name="rollout")
        self.probe_args = source.probe_input(exp) if source.probe_name else None

    def bind(self, job: Any) -> Any:
        from dataclasses import replace

        return replace(job, source=BoundSource(self.source, self.pool, self.publisher))

    def probe(self, weights: dict, version: int) -> Optional[float]:
        """The workers' probe under `weights` (None when the run has no probe input)."""
        if self.probe_args is None:
            return None
        return self.pool.call("probe", version, self.publisher.publish(weights, version), *self.probe_args)

    def probe_start(self, store: Any) -> Optional[float]:
        """The probe before training: measured on a fresh run, kept in `<run>/<probe_file>`."""
        if self.probe_args is None:
            return None
        start = json.loads(store.read_bytes(self.source.probe_file) or b"{}").get("start")
        if start is None and store.latest_complete() is None:
            start = self.probe(self.source.start_weights(self.exp), -2)
            store.write_bytes(self.source.probe_file, json.dumps({"start": start}).encode())
        return start

    def probe_end(self, export_url: Optional[str]) -> Optional[float]:
        """The probe of the exported (trained) weights."""
        if self.probe_args is None or not export_url:
            return None
        return self.probe(self.source.final_weights(self.exp, export_url), -3)

    def close(self) -> None:
        self.pool.close()


def fault_dir(store: Any) -> Optional[str]:
    """Where the actors' once-per-run fault-injection markers live (local runs only)."""
    return os.path.join(store.root, "fault") if store.local else None
