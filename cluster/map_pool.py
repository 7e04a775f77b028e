"""Map pools: stateful Ray actors that each build an expensive worker once (e.g. a tokenizer on a
GPU) and then apply it to items (e.g. shard plans), one item in flight per actor.

The driver hands out items as actors free up and draws a progress bar over items. An item whose
call raises is a failure (reported, the others go on; the actor stays). An item whose actor dies
(node lost, OOM, `ray.kill`) is re-queued to a fresh actor, at most `max_restarts` times per pool.
Exactly-once output is the worker's business: it must write each item's result atomically and
idempotently (e.g. a shard then its marker), so a re-run item replaces any partial attempt.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import ray
from tqdm import tqdm

log = logging.getLogger(__name__)


class MapActor:
    """Builds `factory()` once; `run(item)` applies it."""

    def __init__(self, factory: Callable[[], Callable[[Any], Any]]):
        self.fn = factory()

    def run(self, item: Any) -> Any:
        return self.fn(item)


@dataclass
class MapResult:
    results: dict[int, Any] = field(default_factory=dict)  # item index -> the worker's return value
    failures: dict[int, str] = field(default_factory=dict)  # item index -> the error's last line
    restarts: int = 0  # actors replaced after dying


def _last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def run_map_pool(
    factory: Callable[[], Callable[[Any], Any]],
    items: Sequence[Any],
    *,
    num_actors: int,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_restarts: int = 3,
    name: Callable[[Any], str] = str,
    desc: str = "items",
    done_before: int = 0,
    progress: bool = True,
) -> MapResult:
    """Apply the worker `factory()` builds (once per actor; picklable) to every item; Ray must be
    initialised. `done_before`: items finished by an earlier run (the bar starts there). Raises
    RuntimeError when more than `max_restarts` actors die."""
    out = MapResult()
    if not items:
        return out
    remote = ray.remote(MapActor).options(num_cpus=num_cpus, num_gpus=num_gpus)
    queue: deque[int] = deque(range(len(items)))
    idle = [remote.remote(factory) for _ in range(max(1, min(num_actors, len(items))))]
    running: dict[ray.ObjectRef, tuple[Any, int]] = {}
    bar = tqdm(total=done_before + len(items), initial=done_before, desc=desc, unit=desc.rstrip("s") or "item",
               disable=not progress)
    try:
        while queue or running:
            while queue and idle:
                actor, i = idle.pop(), queue.popleft()
                running[actor.run.remote(items[i])] = (actor, i)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, i = running.pop(ref)
            try:
                out.results[i] = ray.get(ref)
            except ray.exceptions.RayActorError as e:  # the actor is gone: its item goes to a fresh one
                out.restarts += 1
                log.warning("actor died on %s (%s); re-queued (%d/%d restarts)", name(items[i]), _last_line(e),
                            out.restarts, max_restarts)
                if out.restarts > max_restarts:
                    raise RuntimeError(f"{out.restarts} map-pool actors died (limit {max_restarts}); the last on "
                                       f"{name(items[i])}: {_last_line(e)}. Finished items are kept; re-run") from e
                ray.kill(actor, no_restart=True)
                queue.appendleft(i)
                idle.append(remote.remote(factory))
                continue
            except Exception as e:  # noqa: BLE001 - the item failed, the actor is fine: collect, go on
                log.error("%s failed: %s", name(items[i]), e)
                out.failures[i] = _last_line(e)
            idle.append(actor)
            bar.update(1)
    finally:
        bar.close()
        for actor in idle + [a for a, _ in running.values()]:
            ray.kill(actor, no_restart=True)
    return out
