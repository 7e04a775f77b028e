"""The VAπ driver: `run_vapi(cfg)` starts the rollout pool and the learner and runs the iterations
(see cluster/vapi_pool.py for the pieces). Group ids are global (step * batch + j), chunks are
re-issued with the same seed after an actor loss, and the result checks no group was lost or
counted twice."""
from __future__ import annotations

import time
from typing import Any, Optional

import ray
import torch
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.checkpoint import CheckpointStore
from cluster.reporting import RunLogger
from cluster.runtime import init_ray, resolve_use_gpu
from cluster.train_pool import resolve_paths
from cluster.vapi_pool import LearnerWorker, ObjectStorePublisher, PartsFn, RolloutWorker, default_parts
from cluster.worker_loop import checkpoint_storage, default_reader, run_url


def _chunks(n: int, k: int) -> list[slice]:
    size = -(-n // k)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class RolloutPool:
    """`num_rollout_workers` restartable actors in one placement group; `rollouts` spreads a batch
    over them and re-issues a chunk whose actor died (same seed: identical samples)."""

    def __init__(self, cfg, parts_fn: PartsFn, publisher, fault_dir: Optional[str]):
        m = cfg.method
        bundle = {"CPU": m.cpus_per_rollout_worker, **({"GPU": m.gpus_per_rollout_worker} if m.gpus_per_rollout_worker else {})}
        self.pg = placement_group([bundle] * m.num_rollout_workers, strategy="PACK")
        ray.get(self.pg.ready(), timeout=300)
        cls = ray.remote(max_restarts=m.rollout_max_restarts, max_task_retries=0)(RolloutWorker)
        self.actors = [
            cls.options(num_cpus=m.cpus_per_rollout_worker, num_gpus=m.gpus_per_rollout_worker,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)
                        ).remote(cfg, parts_fn, publisher, fault_dir)
            for i in range(m.num_rollout_workers)
        ]
        self.reissued = 0

    def submit(self, version: int, handle: Any, batch: dict, group_ids: torch.Tensor, seed: int) -> list:
        tasks = []
        for i, sl in enumerate(_chunks(len(group_ids), len(self.actors))):
            args = (batch["image"][sl], batch["label"][sl], group_ids[sl], seed + int(group_ids[sl][0]))
            tasks.append([i % len(self.actors), args, self.actors[i % len(self.actors)].run.remote(version, handle, *args)])
        return [version, handle, tasks]

    def gather(self, pending: list, max_reissue: int = 8) -> tuple[list, list[dict]]:
        version, handle, tasks = pending
        parts, stats = [None] * len(tasks), [None] * len(tasks)
        for j, (a, args, ref) in enumerate(tasks):
            for attempt in range(max_reissue + 1):
                try:
                    parts[j], stats[j] = ray.get(ref)
                    break
                except RayActorError:
                    if attempt == max_reissue:
                        raise
                    self.reissued += 1
                    a = self._live_actor(a)
                    print(f"[vapi] rollout actor lost; re-issuing groups {args[2].tolist()} to actor {a}", flush=True)
                    ref = self.actors[a].run.remote(version, handle, *args)
        return parts, stats

    def _live_actor(self, preferred: int, wait_s: float = 120.0) -> int:
        """Index of an actor that answers: the preferred one once Ray has restarted it, else any other."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for a in [preferred] + [i for i in range(len(self.actors)) if i != preferred]:
                try:
                    ray.get(self.actors[a].ping.remote(), timeout=5)
                    return a
                except (RayActorError, ray.exceptions.GetTimeoutError):
                    continue
            time.sleep(0.5)
        raise RuntimeError(f"no rollout actor answered within {wait_s:.0f} s (max_restarts exhausted?)")

    def heldout(self, version: int, handle: Any, images, labels) -> float:
        return ray.get(self.actors[0].heldout.remote(version, handle, images, labels))

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)


def _heldout_batch(cfg) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    n = cfg.method.heldout_images
    if not n or not cfg.data.val_url:
        return None
    from system.data.reader import ShardReader

    d = cfg.data
    r = ShardReader(d.val_url, rank=0, world_size=1, batch_size=n, resolution=d.resolution, num_workers=0,
                    seed=cfg.seed, random_flip=False, storage=d.storage)
    b = next(iter(r))
    return b["image"], b["label"]


def run_vapi(cfg, parts_fn: PartsFn = default_parts, reader_factory=None) -> dict:
    """Post-train with VAπ to `cfg.train.max_steps` iterations (resuming a committed checkpoint)."""
    cfg = resolve_paths(cfg)
    init_ray(cfg.cluster)
    store = CheckpointStore(run_url(cfg), checkpoint_storage(cfg))
    publisher = ObjectStorePublisher()
    pool = RolloutPool(cfg, parts_fn, publisher, store.root + "/fault" if store.local else None)
    gpus = cfg.cluster.gpus_per_worker if resolve_use_gpu(cfg.cluster) else 0
    learner_cls = ray.remote(num_cpus=cfg.cluster.cpus_per_worker, num_gpus=gpus)(LearnerWorker)
    heldout = _heldout_batch(cfg)
    history: list[dict] = []
    failures, result = 0, {}
    while True:
        learner = learner_cls.remote(cfg, parts_fn, publisher)
        try:
            result = _session(cfg, pool, learner, store, heldout, history, reader_factory)
            break
        except RayActorError as e:
            failures += 1
            if failures > cfg.cluster.max_failures:
                raise
            print(f"[vapi] learner lost ({type(e).__name__}); resuming from the last checkpoint", flush=True)
    ray.kill(learner)
    result.update(rollout_reissued=pool.reissued, learner_restarts=failures)
    pool.close()
    return result


def _session(cfg, pool: RolloutPool, learner, store: CheckpointStore, heldout, history: list, reader_factory) -> dict:
    m, bs = cfg.method, cfg.data.batch_size
    step, data_state = ray.get(learner.restore.remote())
    reader = (reader_factory or default_reader)(cfg, 0, 1)
    if data_state.get("reader"):
        reader.load_state_dict(data_state["reader"])
    trained: list[int] = list(data_state.get("groups", []))
    it = iter(reader)
    logger = RunLogger(cfg, store, start_step=step, enabled=True)
    version, handle, put_s = ray.get(learner.publish.remote())
    first = pool.heldout(version, handle, *heldout) if heldout is not None and step == 0 else None
    gids = lambda s: torch.arange(s * bs, (s + 1) * bs)  # noqa: E731
    pending = pool.submit(version, handle, next(it), gids(step), cfg.seed) if step < cfg.train.max_steps else None
    while step < cfg.train.max_steps:
        t0 = time.perf_counter()
        parts, stats = pool.gather(pending)
        t_roll = time.perf_counter() - t0
        groups = torch.cat([p.group_ids.unique() for p in parts]).tolist()
        if sorted(groups) != gids(step).tolist():
            raise RuntimeError(f"step {step}: rollouts cover groups {sorted(groups)}, expected {gids(step).tolist()}")
        reader_state = reader.state_dict()  # position after batch `step` (the next one is not yet read)
        nxt_pending = None
        if m.off_policy and step + 1 < cfg.train.max_steps:  # rollouts of k+1 with the weights of k-1/k
            nxt_pending = pool.submit(version, handle, next(it), gids(step + 1), cfg.seed)
        t1 = time.perf_counter()
        metrics = ray.get(learner.update.remote(parts, step))
        t_upd = time.perf_counter() - t1
        staleness = step - pending[0]  # the learner holds version `step` at update `step`
        trained += groups
        step += 1
        t2 = time.perf_counter()
        version, handle, put_s = ray.get(learner.publish.remote())
        t_pub = time.perf_counter() - t2
        if not m.off_policy and step < cfg.train.max_steps:
            nxt_pending = pool.submit(version, handle, next(it), gids(step), cfg.seed)
        fetch_s = max(s["sync_s"] for s in stats)
        row = {**metrics, "step": step, "staleness": staleness, "iter_s": time.perf_counter() - t0,
               "rollout_wall_s": t_roll, "update_wall_s": t_upd, "publish_s": t_pub, "weight_sync_s": t_pub + fetch_s,
               "sample_s": max(s.get("sample_s", 0) for s in stats), "reward_s": max(s.get("reward_s", 0) for s in stats),
               "rollout_tokens_per_s": sum(p.tokens.numel() for p in parts) / max(t_roll, 1e-9)}
        history.append(row)
        logger.log(step, row)
        pending = nxt_pending
        if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.max_steps:
            ray.get(learner.save.remote({"reader": reader_state, "groups": trained}))
            logger.flush()
    final = pool.heldout(version, handle, *heldout) if heldout is not None else None
    logger.summary({"step": step, "heldout_reward_start": first, "heldout_reward_end": final})
    logger.close()
    return {"step": step, "groups": trained, "history": history, "heldout_start": first, "heldout_end": final,
            "run_url": store.run_url}
