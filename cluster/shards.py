"""Shard writing on the map pool: plan (driver) -> `write_shard` per shard (actors) -> index (driver).

A re-run skips shards whose completion marker matches the plan; an index is written for a split
only when all of its shards are complete, and lists only shards with markers.
"""
from __future__ import annotations

import logging
from typing import Any

import ray

from cluster.actor_pool import run_map_pool
from system.config import MakeShardsConfig
from system.data.shards import (
    ShardPlan,
    find_classes,
    list_split,
    pending_shards,
    plan_shards,
    write_index,
    write_shard,
)

log = logging.getLogger(__name__)


def plan_all(cfg: MakeShardsConfig) -> tuple[dict[str, int], dict[str, list[ShardPlan]]]:
    """Class map and per-split shard plans (deterministic from the sorted files and cfg.seed)."""
    classes = find_classes(cfg.src, cfg.storage)
    plans = {}
    for split in cfg.splits:
        items = list_split(cfg.src, split, classes, cfg.val_labels if split != "train" else None, cfg.storage,
                           cfg.val_synsets)
        plans[split] = plan_shards(items, split, cfg.shard_size, cfg.seed, cfg.max_side, cfg.storage)
    return classes, plans


def run_write_tasks(todo: list[ShardPlan], cfg: MakeShardsConfig, total: int, progress: bool = True) -> list[str]:
    """Write `todo` shards on the map pool (cluster/actor_pool.py: at most `cfg.parallelism` actors,
    a dead actor's shard goes to a fresh one); returns the failed shards, each with its error."""
    parallelism = cfg.parallelism or max(1, int(ray.available_resources().get("CPU", 1)))
    out, storage = cfg.out, cfg.storage
    res = run_map_pool(lambda: lambda plan: write_shard(plan, out, storage), todo, num_actors=parallelism,
                       name=lambda p: f"shard {p.split}/{p.name}", desc="shards", done_before=total - len(todo),
                       progress=progress)
    return [f"{todo[i].split}/{todo[i].name}: {msg}" for i, msg in sorted(res.failures.items())]


def make_shards(cfg: MakeShardsConfig, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Write all splits of `cfg.src` as shards under `cfg.out`; returns {split: index}.
    Needs Ray to be initialised (see `cluster.runtime.init_ray`)."""
    classes, plans = plan_all(cfg)
    todo = [p for split in cfg.splits for p in pending_shards(plans[split], cfg.out, cfg.storage)]
    total = sum(len(p) for p in plans.values())
    log.info("%d shards planned, %d to write", total, len(todo))
    failures = run_write_tasks(todo, cfg, total, progress)
    if failures:
        raise RuntimeError(
            f"{len(failures)} shard(s) failed (complete shards are kept; re-run to finish): " + "; ".join(failures[:5])
        )
    return {split: write_index(plans[split], cfg.out, classes, cfg.storage) for split in cfg.splits}
