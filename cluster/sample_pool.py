"""Sampling as a Ray actor pool: one actor per GPU (or CPU actors), each loads the export once and
makes the parts it is handed (system.eval.sample_parts.PartSampler writes them atomically).

The driver keeps one part in flight per actor. A part whose actor dies (node lost, process
killed) goes back to the queue and is made again by another actor or by the restarted one (actors
have `max_restarts = cluster.max_failures`; a restarting actor is probed with backoff until it
answers); since a part depends only on (seed, part index), the result is the same. A part that
fails more than `cluster.max_failures` times stops the run with its last error; parts already
written stay, and a re-run skips them.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import ray
from ray.exceptions import ActorUnavailableError, RayActorError
from tqdm import tqdm

from cluster.runtime import resolve_use_gpu
from system.config.eval_schema import SampleConfig
from system.data.storage import join, protocol
from system.eval.sample_parts import PartSampler, claim_out, finished_parts, merge_parts, plan_record, write_grids
from system.eval.sampling_plan import Part, SamplingPlan
from system.models.artifacts import model_part

log = logging.getLogger(__name__)


class SampleActor:
    """Actor body: a PartSampler on this actor's device."""

    def __init__(self, cfg: SampleConfig):
        self.sampler = PartSampler(cfg)
        self.out = cfg.out

    def ready(self) -> str:
        return str(self.sampler.device)

    def run(self, part: Part, crash: bool = False) -> dict:
        if crash:  # fault injection: the process dies as on a lost node
            log.warning("crash_at_part=%d: this sampling actor exits now (fault injection)", part.index)
            os._exit(1)
        t = time.perf_counter()
        n = self.sampler.write_part(part, self.out)
        return {"index": part.index, "images": n, "seconds": time.perf_counter() - t}


@dataclass
class PoolResult:
    parts_done: int  # parts made by this run
    images: int  # images made by this run
    seconds: float
    failures: int  # part failures (actor lost mid-part, or an error in the part); each part re-issued
    num_actors: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def default_num_actors(cfg: SampleConfig, use_gpu: bool) -> int:
    res = ray.cluster_resources()
    if use_gpu:
        return max(1, int(res.get("GPU", 0) // cfg.cluster.gpus_per_worker))
    return max(1, int(res.get("CPU", 1) // cfg.cluster.cpus_per_worker))


class SamplePool:
    """`run(todo)` makes the given parts of `plan` with `num_actors` actors."""

    def __init__(self, cfg: SampleConfig, plan: SamplingPlan, num_actors: Optional[int] = None):
        self.cfg, self.plan = cfg, plan
        self.use_gpu = resolve_use_gpu(cfg.cluster)
        self.num_actors = num_actors or cfg.num_actors or default_num_actors(cfg, self.use_gpu)
        self.actors: list = []
        res, c = ray.cluster_resources(), cfg.cluster
        need = {"CPU": self.num_actors * c.cpus_per_worker, "GPU": self.num_actors * c.gpus_per_worker if self.use_gpu else 0}
        short = [f"{need[k]:g} {k}s (have {res.get(k, 0):g})" for k in need if need[k] > res.get(k, 0)]
        if short:
            raise RuntimeError(
                f"{self.num_actors} sampling actors need {' and '.join(short)}; lower num_actors or "
                "cluster.cpus_per_worker / cluster.gpus_per_worker"
            )

    def _start(self, n: int) -> None:
        c = self.cfg.cluster
        remote = ray.remote(SampleActor).options(
            num_cpus=c.cpus_per_worker, num_gpus=c.gpus_per_worker if self.use_gpu else 0,
            max_restarts=c.max_failures, max_task_retries=0,
        )
        self.actors = [remote.remote(self.cfg) for _ in range(n)]
        devices = ray.get([a.ready.remote() for a in self.actors])
        log.info("sampling pool: %d actor(s) on %s", n, ", ".join(sorted(set(devices))))

    def run(self, todo: list[Part], done_images: int = 0, on_part: Callable[[dict], None] | None = None) -> PoolResult:
        """Make `todo`; `done_images` (already on storage) only sets where the bar starts."""
        if not todo:
            return PoolResult(0, 0, 0.0, 0, 0)
        self._start(min(self.num_actors, len(todo)))
        n_actors = len(self.actors)
        self.queue = collections.deque(todo)
        self.issued: collections.Counter = collections.Counter()
        self.part_failures: collections.Counter = collections.Counter()
        inflight: dict = {}  # ObjectRef -> (actor index, part, or None for a readiness probe)
        idle = list(range(n_actors))
        healthy = [True] * n_actors  # False from a failure until a probe answers
        waiting: dict[int, float] = {}  # unhealthy actor -> when to probe it again
        backoff = [1.0] * n_actors
        dead: set[int] = set()
        made = images = 0
        bar = tqdm(total=self.plan.total, initial=done_images, unit="img", desc="sampling", disable=not self.cfg.progress,
                   dynamic_ncols=True)
        t0 = time.perf_counter()
        try:
            while self.queue or any(p is not None for _, p in inflight.values()):
                now = time.monotonic()
                for a in [a for a, t in waiting.items() if t <= now]:
                    del waiting[a]
                    inflight[self.actors[a].ready.remote()] = (a, None)
                while self.queue and idle:
                    a, part = idle.pop(0), self.queue.popleft()
                    crash = self.cfg.crash_at_part == part.index and self.issued[part.index] == 0
                    self.issued[part.index] += 1
                    inflight[self.actors[a].run.remote(part, crash)] = (a, part)
                if len(dead) == n_actors:
                    raise RuntimeError(f"all {n_actors} sampling actors died (restarts used up); {len(self.queue)} part(s) left")
                timeout = max(0.0, min(waiting.values()) - now) if waiting else None
                if not inflight:
                    time.sleep(timeout or 0.0)
                    continue
                done, _ = ray.wait(list(inflight), num_returns=1, timeout=timeout)
                if not done:
                    continue
                a, part = inflight.pop(done[0])
                try:
                    res = ray.get(done[0])
                except ActorUnavailableError as e:  # lost mid-task, or restarting: probe it until it answers
                    if part is not None:
                        self._failed(part, e, count=healthy[a])
                    healthy[a] = False
                    waiting[a] = time.monotonic() + backoff[a]
                    backoff[a] = min(2 * backoff[a], 30.0)
                    continue
                except RayActorError as e:  # died for good (max_restarts used up)
                    dead.add(a)
                    if part is not None:
                        self._failed(part, e)
                    continue
                except Exception as e:  # noqa: BLE001 - the part itself failed (storage error, OOM): retry it
                    if part is not None:
                        self._failed(part, e)
                    idle.append(a)
                    continue
                healthy[a], backoff[a] = True, 1.0
                idle.append(a)
                if part is not None:
                    made, images = made + 1, images + res["images"]
                    bar.update(res["images"])
                    bar.set_postfix_str(f"parts {made}/{len(todo)} failures {self.failures}", refresh=False)
                    if on_part is not None:
                        on_part(res)
        finally:
            bar.close()
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
            self.actors = []
        return PoolResult(made, images, time.perf_counter() - t0, self.failures, n_actors)

    @property
    def failures(self) -> int:
        return sum(self.part_failures.values())

    def _failed(self, part: Part, err: Exception, count: bool = True) -> None:
        """Put `part` back in the queue; stop when one part failed more than cluster.max_failures times."""
        self.queue.appendleft(part)
        if not count:  # issued to an actor that was already restarting: not the part's fault
            return
        self.part_failures[part.index] += 1
        limit = self.cfg.cluster.max_failures
        msg = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        if self.part_failures[part.index] > limit:
            raise RuntimeError(
                f"part {part.index} failed {self.part_failures[part.index]} times (cluster.max_failures={limit}); "
                f"last: {type(err).__name__}: {msg}. Finished parts are kept; re-run to continue."
            ) from err
        log.warning("part %d failed (%s: %s); re-issuing it (%d/%d)", part.index, type(err).__name__, msg[:300],
                    self.part_failures[part.index], limit)


def default_out(export_url: str) -> str:
    """<run>/samples for a run's <run>/export folder."""
    parent = export_url.rstrip("/").rsplit("/", 1)
    return join(parent[0], "samples") if len(parent) == 2 and parent[0] else "samples"


def run_sampling(cfg: SampleConfig) -> dict:
    """The whole job after Ray is up: plan, skip finished parts, make the rest, merge, grids."""
    local = {k: os.path.abspath(v) for k, v in (("export_url", cfg.export_url), ("out", cfg.out)) if v and protocol(v) == "file"}
    cfg = dataclasses.replace(cfg, **local)  # actors may not share the driver's working directory
    if cfg.out is None:
        cfg = dataclasses.replace(cfg, out=default_out(cfg.export_url))
    num_classes = int(model_part(cfg.export_url, "ar", cfg.storage)["config"]["num_classes"])
    if cfg.num_classes is not None and cfg.num_classes > num_classes:
        raise ValueError(f"num_classes={cfg.num_classes} but the AR model of {cfg.export_url} has {num_classes} classes")
    plan = SamplingPlan(cfg.num_per_class, cfg.num_classes or num_classes, cfg.batch_size, cfg.seed)
    claim_out(cfg.out, plan_record(cfg, plan.num_classes, cfg.storage), cfg.storage)
    done = finished_parts(cfg.out, plan, cfg.storage)
    todo = [p for p in plan.parts() if p.index not in done]
    log.info("%d images in %d parts: %d already made, %d to make", plan.total, plan.num_parts, len(done), len(todo))
    result = PoolResult(0, 0, 0.0, 0, 0)
    if todo:
        result = SamplePool(cfg, plan).run(todo, done_images=sum(plan.part(i).size for i in done))
    npz = merge_parts(cfg.out, plan, cfg.storage)
    grids = write_grids(cfg.out, plan, cfg.grid_classes, cfg.grid_cols, cfg.storage) if cfg.grid_classes else []
    return {
        "samples": npz, "grids": grids, "num_images": plan.total, "num_classes": plan.num_classes,
        "parts": plan.num_parts, "parts_skipped": len(done), "parts_made": result.parts_done,
        "failures": result.failures, "num_actors": result.num_actors, "images_per_s": round(result.images_per_s, 3),
    }
