"""VAπ on Ray: the rollout pool and the batch source that feeds the one rank loop.

- `WeightPublisher`: how the learner's weights reach the rollout actors (object store today).
- `RolloutWorker` (a plain class): policy copy + frozen decoder + reward; rolls out one chunk.
- `RolloutPool` (driver side): restartable actors in one placement group, outliving learner restarts.
- `RolloutClient` (picklable): spreads a batch over the actors and gathers it; a dead actor's
  chunk is re-issued with the same seed, so every group id comes back exactly once.
- `RolloutSource`: the learner's `BatchSource`. Every iteration, on all ranks:

      all:    publish the policy (gathered first under ZeRO-3); rank 0 puts it in the object store
      rank 0: [on-policy] roll out iteration k with those weights; gather
              [off-policy] gather iteration k (started one iteration earlier), start k+1
      rank 0 -> all: scatter by whole groups (+ whole-batch statistics)
      all:    the loop runs VapiMethod's "policy" phase (GRPO), commits, exports

- `run_vapi` (driver): starts the pool, runs the one rank loop (cluster/loop.py) on a Ray Train +
  DeepSpeed pool with `VapiMethod` fed by a `RolloutSource`, and measures the held-out
  teacher-forced reward before and after with the actors.

A lost learner rank takes the pool down; Ray Train restarts it (`cluster.max_failures`) and every
rank resumes from the newest committed checkpoint (weights, optimizer, reader position, trained
group ids). On-policy, the resumed run repeats exactly what the lost one did; off-policy, the
first resumed iteration rolls out with the checkpoint's weights where the lost session used the
ones before them (one version fresher), so from there the two runs can differ.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any, Callable, Optional

import ray
import torch
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

import torch.distributed as dist

from cluster.job import SourceContext
from system.config import VapiExperiment
from system.data.source import BatchSource
from system.methods.grpo import group_advantages
from system.methods.vapi import Rollouts, check_fit, heldout_reward, load_parts, rollout, rollout_config

PartsFn = Callable[[Any], tuple]  # cfg -> (VapiPolicy, FrozenTokenizer, LPIPS | None)


def default_parts(exp: VapiExperiment) -> tuple:
    """(policy, frozen tokenizer, LPIPS or None) from `exp.method`, checked against `data.resolution`."""
    m = exp.method
    policy, tok, lp = load_parts(m.export_url, m.llamagen_gpt, m.llamagen_vq, m.lpips_net.vgg_path, m.lpips_net.lin_path,
                                 use_lpips=m.w_lpips > 0, storage=exp.data.storage, llamagen_preset=m.llamagen_preset,
                                 **m.gpt_overrides)
    check_fit(policy, tok, exp.data.resolution)
    return policy, tok, lp


# ---------------------------------------------------------------------------- weight publication
class WeightPublisher:
    """How the learner's weights reach the rollout actors. `publish` runs in the learner and
    returns a small handle; `fetch` runs in an actor. A GPU collective broadcast fits the same API."""

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


# ---------------------------------------------------------------------------- workers (plain classes)
class RolloutWorker:
    """Policy copy + frozen decoder + LPIPS; `run` loads newer weights, then rolls out one chunk."""

    def __init__(self, cfg: VapiExperiment, parts_fn: PartsFn, publisher: WeightPublisher, fault_dir: Optional[str] = None):
        torch.set_num_threads(max(1, int(cfg.method.cpus_per_rollout_worker)))
        self.device = torch.device("cuda" if cfg.method.gpus_per_rollout_worker > 0 and torch.cuda.is_available() else "cpu")
        policy, tok, lp = parts_fn(cfg)
        self.policy, self.tok = policy.to(self.device).eval(), tok.to(self.device)
        self.lpips = lp.to(self.device) if lp is not None else None
        self.vcfg, self.publisher, self.version = rollout_config(cfg.method), publisher, -1
        self.crash_at, self.fault_dir, self.calls = cfg.method.crash_rollout_at_call, fault_dir, 0

    def _maybe_crash(self) -> None:
        self.calls += 1
        if self.crash_at is None or self.fault_dir is None or self.calls != self.crash_at:
            return
        os.makedirs(self.fault_dir, exist_ok=True)
        try:  # atomic: exactly one actor of the pool dies, once per run
            os.close(os.open(os.path.join(self.fault_dir, "rollout_crash"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        print(f"[fault] rollout actor pid {os.getpid()} dies at call {self.calls}", flush=True)
        os._exit(1)

    def ping(self) -> int:
        return os.getpid()

    def _sync(self, version: int, handle: Any) -> float:
        """Load the published weights of `version` unless already held; seconds spent."""
        if version == self.version:
            return 0.0
        t = time.perf_counter()
        self.policy.load_state_dict(self.publisher.fetch(handle), strict=True)
        self.version = version
        return time.perf_counter() - t

    def run(self, version: int, handle: Any, images: torch.Tensor, labels: torch.Tensor, group_ids: torch.Tensor,
            seed: int) -> tuple[Rollouts, dict]:
        """Rollouts of one chunk of images (global group ids) under weights `version`, seeded by `seed`."""
        self._maybe_crash()
        sync = self._sync(version, handle)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        tm: dict = {}
        ro = rollout(self.policy, self.tok, self.lpips, images.to(self.device), labels.to(self.device),
                     group_ids.to(self.device), self.vcfg, gen, timings=tm)
        return ro.to("cpu"), {"sync_s": sync, **tm, "version": self.version, "pid": os.getpid()}

    def heldout(self, version: int, handle: Any, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Mean teacher-forced rollout reward on held-out images under weights `version` (fixed seed)."""
        self._sync(version, handle)
        return heldout_reward(self.policy, self.tok, self.lpips, images.to(self.device), labels.to(self.device), self.vcfg)


# ---------------------------------------------------------------------------- the pool
def _chunks(n: int, k: int) -> list[slice]:
    size = -(-n // k)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class RolloutClient:
    """Handles to the rollout actors (picklable: the learner's rank 0 holds one). `submit` spreads
    one batch of images over the actors; `gather` waits for it. A chunk whose actor died is
    re-issued with the same seed (identical samples): first to the same actor, which Ray restarts
    and queues the task for, then to the others in turn. `reissued` counts re-issues."""

    def __init__(self, actors: list, max_reissue: int = 8):
        self.actors, self.max_reissue = actors, max_reissue
        self.reissued = 0

    def submit(self, version: int, handle: Any, batch: dict, group_ids: torch.Tensor, seed: int) -> dict:
        """Start the rollouts of `batch` (images, labels) as groups `group_ids` under weights
        `version`; chunk seeds derive from `seed` and the chunk's first group id."""
        tasks = []
        for i, sl in enumerate(_chunks(len(group_ids), len(self.actors))):
            a = i % len(self.actors)
            args = (version, handle, batch["image"][sl], batch["label"][sl], group_ids[sl], seed + int(group_ids[sl][0]))
            tasks.append((a, args, self.actors[a].run.remote(*args)))
        return {"version": version, "tasks": tasks, "t_submit": time.perf_counter()}

    def _get(self, a: int, method: str, args: tuple, ref: Any) -> Any:
        """`ray.get(ref)`; when its actor died, re-issue `method(*args)` (same actor, then the others)."""
        for attempt in range(self.max_reissue + 1):
            try:
                return ray.get(ref)
            except RayActorError:
                if attempt == self.max_reissue:
                    raise
                self.reissued += 1
                a = (a + attempt) % len(self.actors)  # same actor first (Ray restarts it), then the next ones
                print(f"[vapi] rollout actor lost during {method}; re-issuing it to actor {a}", flush=True)
                ref = getattr(self.actors[a], method).remote(*args)

    def gather(self, pending: dict) -> tuple[list[Rollouts], list[dict]]:
        """The rollouts of a `submit`, in chunk order, and each chunk's timings."""
        out = [self._get(a, "run", args, ref) for a, args, ref in pending["tasks"]]
        return [o[0] for o in out], [o[1] for o in out]

    def heldout(self, version: int, handle: Any, images: torch.Tensor, labels: torch.Tensor) -> float:
        args = (version, handle, images, labels)
        return self._get(0, "heldout", args, self.actors[0].heldout.remote(*args))


class RolloutPool:
    """Owns `method.num_rollout_workers` restartable `RolloutWorker` actors in one placement group
    (created by the driver, so they outlive learner restarts); `client()` is what the learner uses."""

    def __init__(self, cfg: VapiExperiment, parts_fn: PartsFn, publisher: WeightPublisher, fault_dir: Optional[str] = None,
                 timeout_s: float = 300.0):
        m = cfg.method
        bundle = {"CPU": m.cpus_per_rollout_worker, **({"GPU": m.gpus_per_rollout_worker} if m.gpus_per_rollout_worker else {})}
        self.pg = placement_group([bundle] * m.num_rollout_workers, strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise RuntimeError(f"the rollout pool's placement group ({m.num_rollout_workers} x {bundle}) was not "
                               f"placed within {timeout_s:.0f} s; lower method.num_rollout_workers or its resources")
        self.actors: list = []
        try:  # any failure below gives the placement group back, or the learner pool could wait for it forever
            cls = ray.remote(max_restarts=m.rollout_max_restarts, max_task_retries=0)(RolloutWorker)
            for i in range(m.num_rollout_workers):
                strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)
                self.actors.append(cls.options(num_cpus=m.cpus_per_rollout_worker, num_gpus=m.gpus_per_rollout_worker,
                                               scheduling_strategy=strategy).remote(cfg, parts_fn, publisher, fault_dir))
            ray.get([a.ping.remote() for a in self.actors])  # constructor errors surface here, not mid-run
        except BaseException:
            self.close()
            raise

    def client(self) -> RolloutClient:
        return RolloutClient(self.actors)

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)


# ---------------------------------------------------------------------------- the learner's batch source
def _scatter(batch: Optional[dict], ctx: SourceContext) -> dict:
    """Rank 0's {"rollouts", "stats"} split by images over the ranks; each rank gets its share."""
    if ctx.world_size == 1:
        return batch
    shares = None
    if ctx.rank == 0:
        shares = [{"rollouts": r, "stats": batch["stats"]} for r in batch["rollouts"].to("cpu").split(ctx.world_size)]
    box: list = [None]
    dist.scatter_object_list(box, shares, src=0)
    return box[0]


def batch_stats(batch: Rollouts, adv_eps: float, adv_clip: float) -> dict[str, float]:
    """Whole-batch statistics (rank 0, before the scatter): rewards and group advantages."""
    adv = group_advantages(batch.rewards, batch.group_ids, adv_eps, adv_clip)
    return {"reward_mean": float(batch.rewards.mean()), "reward_std": float(batch.rewards.std()),
            "mse": float(batch.mse.mean()), "lpips": float(batch.lpips.mean()), "adv_mean": float(adv.mean()),
            "adv_std": float(adv.std()), "adv_abs_max": float(adv.abs().max())}


class RolloutSource(BatchSource):
    """The VAπ learner's batch source: each `next` publishes the current policy, gets iteration k's
    rollouts from the pool (rank 0) and scatters them by whole groups. Rank 0's state (reader
    position after the batch of the last finished iteration, trained group ids, re-issue count)
    goes into the checkpoint."""

    def __init__(self, exp: VapiExperiment, ctx: SourceContext, client: RolloutClient, publisher: WeightPublisher,
                 reader_factory: Optional[Callable[[VapiExperiment], Any]] = None):
        self.exp, self.ctx, self.client, self.publisher = exp, ctx, client, publisher
        self.rank0 = ctx.rank == 0
        self.reader = (reader_factory or image_reader)(exp) if self.rank0 else None
        self.reader_it: Any = None
        self.pending: Optional[dict] = None
        self.groups: list[int] = []
        self.reissued_before = 0
        self.reader_state: dict = {}
        self.t_last: Optional[float] = None
        self.t_returned: Optional[float] = None

    def _gids(self, s: int) -> torch.Tensor:  # global group ids of iteration s
        bs = self.exp.data.batch_size
        return torch.arange(s * bs, (s + 1) * bs)

    def _submit(self, s: int, version: int, handle: Any, publish_s: float) -> dict:
        if self.reader_it is None:
            self.reader_it = iter(self.reader)
        pending = self.client.submit(version, handle, next(self.reader_it), self._gids(s), self.exp.seed)
        pending["publish_s"] = publish_s
        return pending

    def __iter__(self):
        while True:
            yield self._next()

    def _next(self) -> dict:
        s, m, t0 = self.ctx.step(), self.exp.method, time.perf_counter()
        sd = self.ctx.module_state("policy")  # collective (ZeRO-3 gathers); {} on ranks > 0
        handle = self.publisher.publish(sd, s) if self.rank0 else None
        publish_s = time.perf_counter() - t0
        batch = None
        if self.rank0:
            if self.pending is None:
                self.pending = self._submit(s, s, handle, publish_s)
            pending = self.pending
            t1 = time.perf_counter()
            parts, timings = self.client.gather(pending)
            t_done = time.perf_counter()
            ro = Rollouts.cat(parts)
            groups = ro.group_ids.unique().tolist()
            if sorted(groups) != self._gids(s).tolist():
                raise RuntimeError(f"step {s}: rollouts cover groups {sorted(groups)}, expected {self._gids(s).tolist()}")
            self.groups += groups
            self.reader_state = self.reader.state_dict()  # after the batch of s (s+1 is not read yet)
            off = m.off_policy and s + 1 < self.exp.train.max_steps
            self.pending = self._submit(s + 1, s, handle, publish_s) if off else None
            stats = batch_stats(ro, m.adv_eps, m.adv_clip)
            wall = t_done - pending["t_submit"]
            stats.update({
                "staleness": float(s - pending["version"]), "publish_s": publish_s, "rollout_wait_s": t_done - t1,
                "rollout_wall_s": wall, "rollout_tokens_per_s": ro.tokens.numel() / max(wall, 1e-9),
                # publish of the version these rollouts used + the slowest actor's fetch and load
                "weight_sync_s": pending["publish_s"] + max(t["sync_s"] for t in timings),
                "sample_s": max(t.get("sample_s", 0.0) for t in timings),
                "reward_s": max(t.get("reward_s", 0.0) for t in timings),
                # the previous iteration (this source sees the loop only between its calls): its wall
                # time, and the part of it outside the source (the learner's update, commit, logging)
                "iter_s": t0 - self.t_last if self.t_last is not None else 0.0,
                "update_wall_s": t0 - self.t_returned if self.t_returned is not None else 0.0,
                "rollout_reissued": float(self.reissued_before + self.client.reissued)})
            batch = {"rollouts": ro, "stats": stats}
        self.t_last = t0
        out = _scatter(batch, self.ctx)
        self.t_returned = time.perf_counter()
        return out

    def state_dict(self) -> dict:
        if not self.rank0:
            return {}
        return {"reader": self.reader_state, "groups": list(self.groups),
                "rollout_reissued": self.reissued_before + self.client.reissued}

    def load_state_dict(self, state: dict) -> None:
        if self.rank0 and state:
            if state.get("reader"):
                self.reader.load_state_dict(state["reader"])
            self.groups = list(state.get("groups", []))
            self.reissued_before = int(state.get("rollout_reissued", 0))

    def summary(self) -> dict:
        return self.state_dict() if self.rank0 else {}


def image_reader(exp: VapiExperiment):
    """Rank 0 reads the images of every iteration for the whole pool."""
    from system.data.stream import ShardReader

    return ShardReader.from_config(exp.data, rank=0, world_size=1, seed=exp.seed)


class RolloutSourceFactory:
    """Picklable batch-source factory handed to every learner rank."""

    def __init__(self, client: RolloutClient, publisher: WeightPublisher, reader_factory: Optional[Callable] = None):
        self.client, self.publisher, self.reader_factory = client, publisher, reader_factory

    def __call__(self, exp: VapiExperiment, ctx: SourceContext) -> RolloutSource:
        return RolloutSource(exp, ctx, self.client, self.publisher, self.reader_factory)


# ---------------------------------------------------------------------------- the driver
HELDOUT_FILE = "vapi_heldout.json"  # the held-out reward before training (kept across resubmissions)


def check_vapi_experiment(exp: VapiExperiment) -> None:
    """Rules that tie the VAπ method to the infra sections, before any actor starts."""
    from system.data.storage import protocol
    from system.methods.vapi import VapiMethod

    m = exp.method
    if exp.data.batch_size < 1:
        raise ValueError(f"data.batch_size={exp.data.batch_size}: images (groups) per iteration must be >= 1")
    if exp.optim.grad_accum != 1:
        raise ValueError(f"optim.grad_accum={exp.optim.grad_accum}: a VAπ iteration is one update on the whole "
                         "batch; set optim.grad_accum=1 and size the batch with data.batch_size")
    if m.crash_rollout_at_call is not None and protocol(exp.checkpoint.storage_path) != "file":
        raise ValueError("method.crash_rollout_at_call (fault injection) needs a local checkpoint.storage_path "
                         "(its once-per-run marker is a local file)")
    if exp.data.batch_size % exp.cluster.num_workers:
        raise ValueError(f"data.batch_size={exp.data.batch_size} images per iteration must split evenly over "
                         f"cluster.num_workers={exp.cluster.num_workers} learner ranks")
    from system.data.shards import check_shard_set

    check_shard_set(exp.data.url, "data.url", exp.data.storage)
    VapiMethod.check(m, VapiMethod.resolve_data(exp))


def heldout_batch(exp: VapiExperiment) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The first `method.heldout_images` validation images (None when off or no `data.val_url`)."""
    n = exp.method.heldout_images
    if not n or not exp.data.val_url:
        return None
    from system.data.stream import ShardReader

    d = exp.data
    r = ShardReader(d.val_url, rank=0, world_size=1, batch_size=n, resolution=d.resolution, num_workers=0,
                    seed=exp.seed, random_flip=False, storage=d.storage)
    b = next(iter(r))
    return b["image"], b["label"]


def run_vapi(exp: VapiExperiment, parts_fn: PartsFn = default_parts,
             reader_factory: Optional[Callable[[VapiExperiment], Any]] = None) -> dict:
    """Post-train with VAπ to `train.max_steps` iterations (resuming a committed checkpoint when
    `checkpoint.resume`). Returns step, trained group ids, held-out reward start/end, the metric
    history, rollout re-issues and learner restarts of this submission."""
    import json

    from cluster.loop import train_loop
    from cluster.train_pool import prepare_run, resolve_job, run_pool

    check_vapi_experiment(exp)
    m = exp.method
    job = resolve_job(exp, micro_batch_size=exp.data.batch_size // exp.cluster.num_workers)
    exp, store, use_gpu = prepare_run(exp, extra_cpus=m.num_rollout_workers * m.cpus_per_rollout_worker,
                                      extra_gpus=m.num_rollout_workers * m.gpus_per_rollout_worker)
    publisher = ObjectStorePublisher()
    pool = RolloutPool(exp, parts_fn, publisher, store.root + "/fault" if store.local else None)
    try:
        client = pool.client()
        held = heldout_batch(exp)
        start = json.loads(store.read_bytes(HELDOUT_FILE) or b"{}").get("start")
        if held is not None and start is None and store.latest_complete() is None:
            policy = parts_fn(replace(exp, method=replace(m, w_lpips=0.0)))[0]
            start = client.heldout(-2, publisher.publish(policy.state_dict(), -2), *held)
            store.write_bytes(HELDOUT_FILE, json.dumps({"start": start}).encode())
        job = replace(job, source=RolloutSourceFactory(client, publisher, reader_factory))
        run_pool(exp, use_gpu, train_loop, {"job": job})
        end = None
        if held is not None and exp.checkpoint.export:
            from system.methods.vapi import exported_policy_state

            sd = exported_policy_state(store.url("export"), exp.data.storage)
            end = client.heldout(-3, publisher.publish(sd, -3), *held)
    finally:
        pool.close()
    summary = json.loads(store.read_bytes("metrics.json") or b"{}")
    sessions = [s for s in store.read_jsonl("sessions.jsonl") if s["submission"] == job.submission]
    return {"step": summary.get("step"), "groups": summary.get("groups", []), "heldout_start": start, "heldout_end": end,
            "rollout_reissued": summary.get("rollout_reissued", 0), "history": store.read_jsonl("metrics.jsonl"),
            "learner_restarts": max(len(sessions) - 1, 0), "run_url": store.run_url}
