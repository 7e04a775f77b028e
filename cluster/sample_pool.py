"""Sampling on the actor pool (cluster/actor_pool.py): one actor per GPU (or CPU actors), each
loads the export once and makes the parts it is handed (system.eval.sample_parts.PartSampler
writes them atomically).

Failure policy `FailurePolicy.retry(cluster.max_failures)`: actors restart in place (Ray
`max_restarts`), a restarting actor is probed with back-off until it answers, and a part whose
actor died (or which raised) is made again by another actor or the restarted one; since a part
depends only on (seed, part index), the result is the same. A part that fails more than
`cluster.max_failures` times stops the run with its last error; parts already written stay, and a
re-run skips them.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import ray

from cluster.actor_pool import ActorPool, FailurePolicy, Progress
from cluster.runtime import resolve_use_gpu
from system.config.eval_schema import SampleConfig
from system.data.storage import join, protocol
from system.eval.sample_parts import (
    PartSampler, claim_out, export_classes, finished_parts, merge_parts, plan_record, write_grids)
from system.eval.sampling_plan import Part, SamplingPlan

log = logging.getLogger(__name__)


class PartWorker:
    """What each sampling actor holds: a PartSampler on this actor's device; `part` -> its stats."""

    def __init__(self, cfg: SampleConfig):
        self.sampler = PartSampler(cfg)
        self.device, self.out = self.sampler.device, cfg.out

    def __call__(self, part: Part) -> dict:
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
        res, c = ray.cluster_resources(), cfg.cluster
        need = {"CPU": self.num_actors * c.cpus_per_worker, "GPU": self.num_actors * c.gpus_per_worker if self.use_gpu else 0}
        short = [f"{need[k]:g} {k}s (have {res.get(k, 0):g})" for k in need if need[k] > res.get(k, 0)]
        if short:
            raise RuntimeError(
                f"{self.num_actors} sampling actors need {' and '.join(short)}; lower num_actors or "
                "cluster.cpus_per_worker / cluster.gpus_per_worker"
            )

    def run(self, todo: list[Part], done_images: int = 0, on_part: Callable[[dict], None] | None = None) -> PoolResult:
        """Make `todo`; `done_images` (already on storage) only sets where the bar starts."""
        if not todo:
            return PoolResult(0, 0, 0.0, 0, 0)
        c = self.cfg.cluster
        pool = ActorPool(functools.partial(PartWorker, self.cfg), min(self.num_actors, len(todo)),
                         num_cpus=c.cpus_per_worker, num_gpus=c.gpus_per_worker if self.use_gpu else 0,
                         policy=FailurePolicy.retry(c.max_failures), name="sampling")
        log.info("sampling pool: %d actor(s) on %s", len(pool.actors), ", ".join(sorted(set(pool.devices))))
        crash = next((i for i, p in enumerate(todo) if p.index == self.cfg.crash_at_part), None)
        try:
            res = pool.map(todo, label=lambda p: f"part {p.index}", crash_at=crash,
                           on_result=(lambda i, r: on_part(r)) if on_part is not None else None,
                           progress=Progress(desc="sampling", unit="img", total=self.plan.total, initial=done_images,
                                             size=lambda r: r["images"], enabled=self.cfg.progress))
        finally:
            n_actors = len(pool.actors)
            pool.close()
        images = sum(r["images"] for r in res.results.values())
        return PoolResult(len(res.results), images, res.seconds, res.stats.deaths + res.stats.errors, n_actors)


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
    num_classes = export_classes(cfg.export_url, cfg.storage)
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
