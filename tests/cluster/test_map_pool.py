"""The map pool on a local Ray: an actor that dies mid-shard is replaced and its shard re-done, so the
token set still holds every (key, view) exactly once; a re-run rewrites nothing; a failing item is
reported while the others finish; actor deaths are bounded."""
from __future__ import annotations

import functools
import os
import sys

import pytest
import ray
import torch

from cluster.actor_pool import run_map_pool
from cluster.runtime import init_ray
from system.config import ClusterConfig
from system.data import TokenShardReader, read_index
from system.data.embedded import ensure_embedded_dataset
from system.data.tokens import token_section, write_token_index
from system.encode.pretokenize import ShardTokenizer, plan_token_shards, tokenizer_fingerprint
from system.models.artifacts import Artifact, save_export
from system.models.tokenizer1d import Tokenizer1D, tokenizer_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    assert not ray.is_initialized()
    init_ray(ClusterConfig(local_num_cpus=2), verbose=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors import no test module
    yield
    ray.shutdown()


class DiesOnce:
    """The real shard worker, except that on `victim` the first attempt writes the tar, drops the
    marker (a death between the two) and kills its process."""

    def __init__(self, flag: str, victim: str, make):
        self.flag, self.victim, self.worker = flag, victim, make()

    def __call__(self, plan):
        marker = self.worker(plan)
        if plan.name == self.victim and not os.path.exists(self.flag):
            open(self.flag, "w").close()
            os.remove(os.path.join(self.worker.out_url, plan.name + ".done.json"))
            os._exit(1)
        return marker


def always_dies(item):
    os._exit(1)


def fails_on_two(item):
    if item == 2:
        raise ValueError(f"item {item} is bad")
    return item * 10


def test_dead_actor_shard_is_redone_exactly_once_and_rerun_skips(local_ray, tmp_path):
    src = ensure_embedded_dataset(str(tmp_path / "src"), split="val", per_class=3, resolution=40, num_shards=3)
    torch.manual_seed(0)
    exp = save_export(str(tmp_path / "export"), {"tokenizer": Artifact.of("tokenizer1d", Tokenizer1D(tokenizer_config("debug-tiny")))})
    out = str(tmp_path / "tokens")
    info = tokenizer_fingerprint(exp)
    index, plans = plan_token_shards(src, info, "flip", 32, shard_size=4)  # 3 shards of 8 -> 6 token shards
    make = functools.partial(ShardTokenizer, exp, out, augment="flip", resolution=32, batch_size=8)
    worker = functools.partial(DiesOnce, str(tmp_path / "died"), plans[2].name, make)
    res = run_map_pool(worker, plans, num_actors=2, max_restarts=1, progress=False, name=lambda p: p.name)
    assert res.restarts == 1 and not res.failures and sorted(res.results) == list(range(len(plans)))
    assert os.path.exists(tmp_path / "died")
    meta = token_section(64, 16, "flip", info)
    idx = write_token_index(plans, out, index["classes"], meta)
    assert idx["num_samples"] == 2 * index["num_samples"] and len(idx["shards"]) == len(plans)
    keys = [k for b in TokenShardReader(out, batch_size=5, drop_last=False).one_epoch() for k in b["key"]]
    src_keys = {k for b in _image_keys(src) for k in b}
    assert sorted(keys) == sorted(f"{k}_a{a}" for k in src_keys for a in (0, 1))  # every (key, view) once

    stamps = {p.name: os.stat(os.path.join(out, p.name)).st_mtime_ns for p in plans}
    again = run_map_pool(make, plans, num_actors=2, progress=False)  # a re-run: every marker matches
    assert [again.results[i] for i in range(len(plans))] == [res.results[i] for i in range(len(plans))]
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in stamps} == stamps
    assert read_index(out) == idx


def test_failures_are_collected_and_deaths_bounded(local_ray):
    res = run_map_pool(lambda: fails_on_two, list(range(5)), num_actors=2, progress=False)
    assert res.results == {0: 0, 1: 10, 3: 30, 4: 40} and list(res.failures) == [2] and "item 2 is bad" in res.failures[2]
    with pytest.raises(RuntimeError, match=r"2 map-pool actors died \(limit 1\).*item-0"):
        run_map_pool(lambda: always_dies, [0], num_actors=1, max_restarts=1, progress=False, name=lambda i: f"item-{i}")


def _image_keys(src: str):
    from system.data.stream import ShardReader

    for b in ShardReader(src, batch_size=8, resolution=8, random_flip=False, drop_last=False).one_epoch():
        yield b["key"]
