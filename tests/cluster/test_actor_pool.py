"""The one actor pool: failure policies as plain objects, and on a local Ray the asynchronous
submit/gather (results in item order; a dead actor's item re-issued unchanged to the restarted
actor or another one) and the retry / fail-fast rules for an item that raises."""
from __future__ import annotations

import os
import sys

import pytest

from cluster.actor_pool import FailurePolicy, Item, PoolStats


def test_policies_bound_deaths_and_item_failures():
    item = Item(0, (), "run", "item 0")
    collect = FailurePolicy.collect(max_deaths=1)
    collect.on_death(item, PoolStats(deaths=1), RuntimeError("lost"), "map-pool")
    with pytest.raises(RuntimeError, match=r"2 map-pool actors died \(limit 1\); the last on item 0: lost"):
        collect.on_death(item, PoolStats(deaths=2), RuntimeError("lost"), "map-pool")
    assert collect.on_error(item, PoolStats(), ValueError("bad")) is False  # collected, not re-run

    retry, item = FailurePolicy.retry(max_failures=2), Item(0, (), "run", "item 0")
    assert retry.actor_restarts == 2
    assert retry.on_error(item, PoolStats(), ValueError("bad")) and item.failures == 1
    retry.on_death(item, PoolStats(deaths=5), RuntimeError("lost"), "sampling")  # no pool-wide limit
    with pytest.raises(RuntimeError, match=r"item 0 failed 3 times \(limit 2\); last: ValueError: bad"):
        retry.on_error(item, PoolStats(), ValueError("bad"))

    with pytest.raises(ValueError, match="bad"):
        FailurePolicy.fail_fast(actor_restarts=3).on_error(Item(1, (), "run", "item 1"), PoolStats(), ValueError("bad"))


class Seeded:
    """A deterministic worker: `run(seed, n)` depends only on its arguments; the first call with
    `seed == die_on` (across the pool, marked by a file) kills the process, `fail_once` raises once."""

    def __init__(self, flag_dir: str, die_on: int = -1, fail_once: int = -1):
        self.flag_dir, self.die_on, self.fail_once = flag_dir, die_on, fail_once

    def _first(self, what: str) -> bool:
        try:
            os.close(os.open(os.path.join(self.flag_dir, what), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def run(self, seed: int, n: int) -> list[int]:
        import random

        if seed == self.die_on and self._first("died"):
            os._exit(1)
        if seed == self.fail_once and self._first("failed"):
            raise ValueError(f"seed {seed} failed once")
        rng = random.Random(seed)
        return [rng.randrange(1000) for _ in range(n)]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from cluster.runtime import init_ray
    from system.config import ClusterConfig

    started = not ray.is_initialized()
    init_ray(ClusterConfig(local_num_cpus=2), verbose=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors import no test module
    yield
    if started:
        ray.shutdown()


@pytest.mark.slow
def test_async_batch_survives_a_dead_actor_and_errors_follow_the_policy(local_ray, tmp_path):
    import functools
    import pickle

    from cluster.actor_pool import ActorPool

    items = [(seed, 3) for seed in range(10, 16)]
    expected = [Seeded(str(tmp_path)).run(*it) for it in items]
    pool = ActorPool(functools.partial(Seeded, str(tmp_path), die_on=12), 2, num_cpus=0.5,
                     policy=FailurePolicy.fail_fast(actor_restarts=1), name="test")
    try:
        first = pool.submit(items)
        assert pool.gather(first) == expected  # in item order, the lost item re-issued with the same seed
        assert pool.stats.deaths == 1 and pool.stats.reissued >= 1 and os.path.exists(tmp_path / "died")
        assert pool.gather(pool.submit(items[::-1])) == expected[::-1]  # the restarted actor works again
        copy = pickle.loads(pickle.dumps(pool))  # what a learner's rank 0 holds: same actors, fresh state
        assert copy.stats.deaths == 0 and copy.call("run", 7, 2) == Seeded(str(tmp_path)).run(7, 2)
    finally:
        pool.close()

    retry = ActorPool(functools.partial(Seeded, str(tmp_path), fail_once=11), 1, num_cpus=0.5,
                      policy=FailurePolicy.retry(max_failures=1), name="test")
    try:
        assert retry.gather(retry.submit(items[:2])) == expected[:2] and retry.stats.errors == 1
    finally:
        retry.close()

    os.makedirs(tmp_path / "fresh")
    fast = ActorPool(functools.partial(Seeded, str(tmp_path / "fresh"), fail_once=10), 1, num_cpus=0.5,
                     policy=FailurePolicy.fail_fast(actor_restarts=0), name="test")
    try:
        with pytest.raises(ValueError, match="seed 10 failed once"):
            fast.gather(fast.submit(items[:1]))
    finally:
        fast.close()
