"""Shard writing as Ray tasks: plan (driver) -> `write_shard` per shard (tasks) -> index (driver).

A re-run skips shards whose completion marker matches the plan; an index is written for a split
only when all of its shards are complete, and lists only shards with markers.
"""
from __future__ import annotations

import logging
from typing import Any

import ray
from tqdm import tqdm

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
    """Write `todo` shards with at most `cfg.parallelism` Ray tasks in flight; returns failures."""
    parallelism = cfg.parallelism or max(1, int(ray.available_resources().get("CPU", 1)))
    task = ray.remote(num_cpus=1)(write_shard)
    failures: list[str] = []
    bar = tqdm(total=total, initial=total - len(todo), desc="shards", unit="shard", disable=not progress)
    queue, running = list(todo), {}
    while queue or running:
        while queue and len(running) < parallelism:
            plan = queue.pop(0)
            running[task.remote(plan, cfg.out, cfg.storage)] = plan
        done, _ = ray.wait(list(running), num_returns=1)
        plan = running.pop(done[0])
        try:
            ray.get(done[0])
        except Exception as e:  # noqa: BLE001 - collect, finish the others, report at the end
            log.error("shard %s/%s failed: %s", plan.split, plan.name, e)
            failures.append(f"{plan.split}/{plan.name}: {str(e).strip().splitlines()[-1]}")
        bar.update(1)
    bar.close()
    return failures


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
