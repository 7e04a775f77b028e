"""Encoding a shard set on a Ray map pool (`system.pipelines.encode.ShardEncoding`: pre-tokenization,
the latent cache, any per-shard encoder of a frozen export): the unfinished shards go to actors that
each build the encoder once (GPU actors when cluster.device says so), then the index is written
last (its existence means done, so an index from an earlier run is removed before shards are
rewritten). Resumable: finished shards (content-hashed markers) are skipped."""
from __future__ import annotations

import functools

from cluster.console import say
from cluster.actor_pool import run_map_pool
from cluster.runtime import init_ray, resolve_use_gpu
from system.data.shards import INDEX, complete_markers
from system.data.storage import exists, filesystem, join


def run_encoding(enc, progress: bool = True) -> dict:
    """`enc` (prepared: `enc.prepare()` ran, before Ray) on a map pool; Ray is joined or started.
    Returns {"index", "written", "restarts", "bytes", "skipped"}; RuntimeError naming the shards
    that failed (finished shards are kept: a re-run continues)."""
    import ray

    cfg = enc.cfg
    init_ray(cfg.cluster)
    plans = enc.plans()
    todo = [p for p in plans if p.name not in complete_markers(plans, cfg.out, cfg.storage)]
    gpu = resolve_use_gpu(cfg.cluster)
    have = ray.cluster_resources().get("GPU" if gpu else "CPU", 1)
    actors = cfg.num_actors or max(1, int(have // (cfg.cluster.gpus_per_worker if gpu else cfg.cluster.cpus_per_worker)))
    say(f"{enc.title}: {len(plans)} shards ({len(plans) - len(todo)} done), {min(actors, max(len(todo), 1))} "
        f"{'GPU' if gpu else 'CPU'} actors, {enc.detail()}")
    stale = join(plans[0].split_url(cfg.out), INDEX) if plans else ""
    if todo and exists(stale, cfg.storage):  # the set is about to change: until its new index is written it is not done
        fs, path = filesystem(stale, cfg.storage)
        fs.rm(path)
    res = run_map_pool(functools.partial(enc.worker(), device="cuda" if gpu else "cpu"), todo, num_actors=actors,
                       num_cpus=cfg.cluster.cpus_per_worker, num_gpus=cfg.cluster.gpus_per_worker if gpu else 0,
                       max_restarts=cfg.cluster.max_failures, name=lambda p: p.source, desc="shards",
                       done_before=len(plans) - len(todo), progress=progress)
    if res.failures:
        bad = "; ".join(f"{todo[i].name}: {msg}" for i, msg in list(res.failures.items())[:5])
        raise RuntimeError(f"{len(res.failures)} shard(s) failed (finished shards are kept; re-run): {bad}")
    out = enc.write_index(plans)
    markers = complete_markers(plans, cfg.out, cfg.storage)
    size = sum(m["bytes"] for m in markers.values())
    return {"index": out, "written": len(todo), "restarts": res.restarts, "bytes": size,
            "skipped": sum(m.get("skipped", 0) for m in markers.values())}
