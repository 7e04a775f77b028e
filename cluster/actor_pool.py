"""One actor pool for map, sample and rollout work.

`ActorPool(factory, num_actors, ...)` starts `num_actors` Ray actors (each with `num_cpus` /
`num_gpus`, optionally in one PACK placement group, restarted in place by Ray up to the policy's
`actor_restarts`); each builds the plain worker `factory()` once (a shard tokenizer, a part
sampler, a policy copy + frozen decoder + reward) and then runs work items on it:
`worker.<method>(*args)`.

- `map(items)`: synchronous; one item in flight per actor, a progress bar; results by item index.
- `submit(items)` / `gather(pending)`: asynchronous; the items go out to the actors at once (Ray
  queues them per actor) and `gather` returns their results in item order, so the caller can
  overlap its own work with them (a learner's update with the next rollouts).

Every item carries what decides its result (its seed, its part index, its shard plan), so running
it again gives the same result; that is what makes re-issuing safe. A `FailurePolicy` decides what
a failure costs:

- the item's actor died (node lost, OOM kill, `os._exit`): the item goes back to the front of the
  queue and runs on the next actor that answers: the same one once Ray has restarted it (the pool
  probes a lost actor with back-off until it answers), another one, or a fresh one started in its
  place (`replace_dead`); `max_deaths` bounds the losses of one pool, `max_item_failures` the
  failures of one item;
- the item itself raised (the actor is fine): "collect" the error and go on, "retry" the item, or
  "raise" (fail fast).

Presets: `FailurePolicy.collect` (map: re-queue a shard to a fresh actor, collect item errors),
`FailurePolicy.retry` (sampling: restartable actors, a part re-issued up to N times) and
`FailurePolicy.fail_fast` (rollouts: a dead actor's group re-issued with the same seed, any error
ends the run). `run_map_pool` is the map pool as one call.

Exactly-once output is the worker's business: it writes each item's result atomically and
idempotently (a shard, then its marker), so a re-run item replaces any partial attempt.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import ray
from ray.exceptions import ActorUnavailableError, RayActorError
from tqdm import tqdm

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0


def last_line(e: BaseException) -> str:
    """The last non-empty line of an error's message (Ray wraps it in a traceback)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


class PoolActor:
    """An actor's body: builds the plain worker `factory()` once; `call(method, args)` runs
    `worker.<method>(*args)`. `crash`: fault injection, the process dies as on a lost node."""

    def __init__(self, factory: Callable[[], Any]):
        self.worker = factory()

    def ready(self) -> str:
        return str(getattr(self.worker, "device", "cpu"))

    def call(self, method: str, args: tuple, crash: bool = False) -> Any:
        if crash:
            log.warning("fault injection: this %s actor exits now", type(self.worker).__name__)
            os._exit(1)
        return getattr(self.worker, method)(*args)


@dataclass
class PoolStats:
    deaths: int = 0  # actor losses (each put back what it was running)
    replaced: int = 0  # fresh actors started in place of dead ones
    reissued: int = 0  # items run again (their actor died, or they raised under "retry")
    errors: int = 0  # items that raised (collected, retried or raised)


@dataclass
class Item:
    """One work item: `worker.<method>(*args)`; its result (or collected error) once `done`."""

    index: int
    args: tuple
    method: str
    label: str
    crash: bool = False  # fault injection on its first attempt
    attempts: int = 0
    failures: int = 0  # deaths it was lost in + retried errors
    done: bool = False
    result: Any = None
    error: Optional[str] = None


@dataclass(frozen=True)
class FailurePolicy:
    """What the pool does when an item's actor dies or an item raises (see the module docstring).
    Subclass and override `on_death` / `on_error` for other rules."""

    errors: str = "raise"  # an item that raised: "collect" | "retry" | "raise"
    max_deaths: Optional[int] = None  # actor losses per pool before the run stops (None: no limit)
    max_item_failures: Optional[int] = None  # failures of one item before the run stops (None: no limit)
    actor_restarts: int = 0  # Ray max_restarts of each actor (restarted in place)
    replace_dead: bool = False  # an actor gone for good is replaced by a fresh one

    @classmethod
    def collect(cls, max_deaths: int = 3) -> "FailurePolicy":
        """Map work: a dead actor's item goes to a fresh actor (at most `max_deaths` per pool); an
        item's error is collected and the others go on."""
        return cls(errors="collect", max_deaths=max_deaths, replace_dead=True)

    @classmethod
    def retry(cls, max_failures: int) -> "FailurePolicy":
        """Sampling: actors restart in place (up to `max_failures` times each); an item whose actor
        died or which raised is re-issued, at most `max_failures` times."""
        return cls(errors="retry", max_item_failures=max_failures, actor_restarts=max_failures)

    @classmethod
    def fail_fast(cls, actor_restarts: int, max_reissue: int = 8) -> "FailurePolicy":
        """Rollouts: actors restart in place; a dead actor's item is re-issued unchanged (same seed,
        same samples) up to `max_reissue` times; an item's error ends the run."""
        return cls(errors="raise", max_item_failures=max_reissue, actor_restarts=actor_restarts)

    def on_death(self, item: Item, stats: PoolStats, err: Exception, pool: str) -> None:
        """`item`'s actor died (`stats.deaths` counts it already); raise to stop the run, return to
        re-queue the item."""
        if self.max_deaths is not None and stats.deaths > self.max_deaths:
            raise RuntimeError(f"{stats.deaths} {pool} actors died (limit {self.max_deaths}); the last on {item.label}: "
                               f"{last_line(err)}. Finished items are kept; re-run") from err
        self._failed(item, err)

    def on_error(self, item: Item, stats: PoolStats, err: Exception) -> bool:
        """`item` raised: True re-queues it, False collects the error; raise to stop the run."""
        if self.errors == "raise":
            raise err
        if self.errors == "collect":
            return False
        self._failed(item, err)
        return True

    def _failed(self, item: Item, err: Exception) -> None:
        item.failures += 1
        limit = self.max_item_failures
        if limit is not None and item.failures > limit:
            raise RuntimeError(f"{item.label} failed {item.failures} times (limit {limit}); last: {type(err).__name__}: "
                               f"{last_line(err)}. Finished items are kept; re-run to continue.") from err
        log.warning("%s failed (%s: %s); re-issuing it (%d/%s)", item.label, type(err).__name__, last_line(err)[:300],
                    item.failures, limit if limit is not None else "-")


@dataclass
class Progress:
    """The progress bar of a `map`: by default one step per item; `size(result)` for another unit."""

    desc: str = "items"
    unit: str = "item"
    total: Optional[int] = None  # default: `initial` + the number of items
    initial: int = 0  # already done by an earlier run
    size: Callable[[Any], int] = field(default=lambda result: 1)
    enabled: bool = True


@dataclass
class MapResult:
    results: dict[int, Any] = field(default_factory=dict)  # item index -> the worker's return value
    failures: dict[int, str] = field(default_factory=dict)  # item index -> the error's last line (collected)
    stats: PoolStats = field(default_factory=PoolStats)
    seconds: float = 0.0

    @property
    def restarts(self) -> int:  # actors lost (each item re-run on another or a fresh one)
        return self.stats.deaths


class ActorPool:
    """`num_actors` actors each holding `factory()` (picklable; built once per actor) under a
    `FailurePolicy`. Picklable: a copy (e.g. on a learner's rank 0) drives the same actors with its
    own scheduling state; only the creator calls `close`."""

    def __init__(self, factory: Callable[[], Any], num_actors: int, *, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 policy: FailurePolicy = FailurePolicy(), placement_group: bool = False, name: str = "actor-pool",
                 start_timeout_s: float = 300.0):
        from ray.util.placement_group import placement_group as make_pg, remove_placement_group

        self.factory, self.policy, self.name = factory, policy, name
        self.options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": policy.actor_restarts,
                        "max_task_retries": 0}
        self.pg = None
        if placement_group:
            bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
            self.pg = make_pg([bundle] * num_actors, strategy="PACK")
            try:
                ray.get(self.pg.ready(), timeout=start_timeout_s)
            except ray.exceptions.GetTimeoutError:
                remove_placement_group(self.pg)
                raise RuntimeError(f"the {name} pool's placement group ({num_actors} x {bundle}) was not placed within "
                                   f"{start_timeout_s:.0f} s; use fewer actors or smaller ones") from None
        self.actors: list = []
        try:  # any failure below gives the placement group back (a training pool could wait for it forever)
            self.actors = [self._spawn(i) for i in range(num_actors)]
            self.devices = ray.get([a.ready.remote() for a in self.actors])  # constructor errors surface here
        except BaseException:
            self.close()
            raise
        self._reset()

    # ------------------------------------------------------------------ actors
    def _spawn(self, slot: int) -> Any:
        opts = dict(self.options)
        if self.pg is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=slot)
        return ray.remote(PoolActor).options(**opts).remote(self.factory)

    def close(self) -> None:
        """Kill the actors and give the placement group back (the creator, once)."""
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None

    # ------------------------------------------------------------------ scheduling state
    _STATE = ("stats", "_queue", "_inflight", "_healthy", "_epoch", "_load", "_dead", "_probe_at", "_backoff")

    def _reset(self) -> None:
        n = len(self.actors)
        self.stats = PoolStats()
        self._queue: deque[Item] = deque()
        self._inflight: dict[Any, tuple[int, int, Optional[Item]]] = {}  # ref -> (slot, epoch, item or None: a probe)
        self._healthy = [True] * n  # False from a loss until a probe answers
        self._epoch = [0] * n  # bumped at each loss: later failures of the same loss are not counted again
        self._load = [0] * n
        self._dead: set[int] = set()
        self._probe_at: dict[int, float] = {}
        self._backoff = [0.5] * n

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._STATE}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    # ------------------------------------------------------------------ the loop
    def _dispatch(self, cap: Optional[int]) -> None:
        """Send queued items to healthy actors, least loaded first, at most `cap` in flight each."""
        n = len(self.actors)
        while self._queue:
            free = [s for s in range(n) if self._healthy[s] and s not in self._dead and (cap is None or self._load[s] < cap)]
            if not free:
                return
            s = min(free, key=lambda i: self._load[i])
            it = self._queue.popleft()
            ref = self.actors[s].call.remote(it.method, it.args, it.crash and it.attempts == 0)
            it.attempts += 1
            self._inflight[ref] = (s, self._epoch[s], it)
            self._load[s] += 1

    def _step(self, cap: Optional[int]) -> Optional[Item]:
        """Dispatch, wait for one answer and handle it; the item it finished, if any."""
        self._dispatch(cap)
        now = time.monotonic()
        for s in [s for s, t in self._probe_at.items() if t <= now]:
            del self._probe_at[s]
            self._inflight[self.actors[s].ready.remote()] = (s, self._epoch[s], None)
        if len(self._dead) == len(self.actors):
            raise RuntimeError(f"all {len(self.actors)} {self.name} actors died (restarts used up); "
                               f"{len(self._queue)} item(s) left. Finished items are kept; re-run")
        timeout = max(0.0, min(self._probe_at.values()) - now) if self._probe_at else None
        if not self._inflight:
            time.sleep(timeout or 0.0)
            return None
        done, _ = ray.wait(list(self._inflight), num_returns=1, timeout=timeout)
        if not done:
            return None
        s, epoch, it = self._inflight.pop(done[0])
        if it is not None:
            self._load[s] -= 1
        try:
            value = ray.get(done[0])
        except RayActorError as e:
            self._lost(s, epoch, it, e)
            return None
        except Exception as e:  # noqa: BLE001 - the item raised; its actor is fine
            if it is None:
                raise
            self.stats.errors += 1
            if self.policy.on_error(it, self.stats, e):
                self.stats.reissued += 1
                self._queue.appendleft(it)
                return None
            log.error("%s failed: %s", it.label, e)
            it.error, it.done = last_line(e), True
            return it
        if it is None:  # a probe answered: the actor is back
            self._healthy[s], self._backoff[s] = True, 0.5
            return None
        it.result, it.done = value, True
        return it

    def _lost(self, s: int, epoch: int, it: Optional[Item], err: Exception) -> None:
        if it is None:  # a probe failed: still restarting (probe again later), or gone for good
            if isinstance(err, ActorUnavailableError):
                self._probe_at[s] = time.monotonic() + self._backoff[s]
                self._backoff[s] = min(2 * self._backoff[s], MAX_BACKOFF_S)
            elif self.policy.replace_dead:
                ray.kill(self.actors[s], no_restart=True)
                self.actors[s] = self._spawn(s)
                self.stats.replaced += 1
                self._epoch[s] += 1
                self._healthy[s], self._backoff[s] = True, 0.5
            else:
                self._dead.add(s)
            return
        new = epoch == self._epoch[s]  # not a second item of a loss already seen
        if new:
            self._epoch[s] += 1
            self._healthy[s] = False
            self._probe_at[s] = time.monotonic()  # answers once restarted; fails when gone for good
            self.stats.deaths += 1
            log.warning("a %s actor died running %s (%s)", self.name, it.label, last_line(err))
            self.policy.on_death(it, self.stats, err, self.name)
        self.stats.reissued += 1
        self._queue.appendleft(it)

    # ------------------------------------------------------------------ synchronous
    def map(self, items: Sequence[Any], *, method: str = "__call__", label: Callable[[Any], str] = str,
            progress: Optional[Progress] = None, crash_at: Optional[int] = None,
            on_result: Optional[Callable[[int, Any], None]] = None) -> MapResult:
        """`worker.<method>(item)` for every item, one in flight per actor; results by item index.
        `crash_at`: fault injection, the actor running that item dies on its first attempt."""
        out, t0 = MapResult(stats=self.stats), time.perf_counter()
        work = [Item(i, (x,), method, label(x), crash=i == crash_at) for i, x in enumerate(items)]
        self._queue.extend(work)
        p = progress or Progress(enabled=False)
        bar = tqdm(total=p.total if p.total is not None else p.initial + len(work), initial=p.initial, desc=p.desc,
                   unit=p.unit, disable=not p.enabled, dynamic_ncols=True)
        left = len(work)
        try:
            while left:
                it = self._step(cap=1)
                if it is None:
                    continue
                left -= 1
                if it.error is not None:
                    out.failures[it.index] = it.error
                    bar.update(1)
                else:
                    out.results[it.index] = it.result
                    bar.update(p.size(it.result))
                    if on_result is not None:
                        on_result(it.index, it.result)
                if self.stats.deaths or self.stats.errors:
                    bar.set_postfix_str(f"{len(work) - left}/{len(work)} done, {self.stats.deaths} actor(s) lost, "
                                        f"{self.stats.errors} error(s)", refresh=False)
        finally:
            bar.close()
        out.seconds = time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ asynchronous
    def submit(self, items: Sequence[tuple], method: str = "run") -> list[Item]:
        """Start `worker.<method>(*args)` for every args tuple now; `gather` the returned handle."""
        work = [Item(i, tuple(args), method, f"{self.name} item {i}") for i, args in enumerate(items)]
        self._queue.extend(work)
        self._dispatch(cap=None)
        return work

    def gather(self, pending: list[Item]) -> list[Any]:
        """The results of a `submit`, in item order (re-issuing lost items as the policy says)."""
        while not all(it.done for it in pending):
            self._step(cap=None)
        failed = [it for it in pending if it.error is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} {self.name} item(s) failed; the first, {failed[0].label}: {failed[0].error}")
        return [it.result for it in pending]

    def call(self, method: str, *args: Any) -> Any:
        """One `worker.<method>(*args)` on some actor, under the same policy."""
        return self.gather(self.submit([args], method))[0]


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
    initialised. An item's error is collected (the others go on); a dead actor's item goes to a
    fresh actor, and more than `max_restarts` dead actors stop the run with a RuntimeError.
    `done_before`: items finished by an earlier run (the bar starts there)."""
    if not items:
        return MapResult()
    pool = ActorPool(factory, max(1, min(num_actors, len(items))), num_cpus=num_cpus, num_gpus=num_gpus,
                     policy=FailurePolicy.collect(max_restarts), name="map-pool")
    try:
        return pool.map(items, label=name, progress=Progress(desc=desc, unit=desc.rstrip("s") or "item",
                                                             initial=done_before, enabled=progress))
    finally:
        pool.close()
