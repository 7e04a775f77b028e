"""The reader's partition guarantees on uneven shards (issue "Cluster-ready", part A) and the
world-size-independent position (part B).

7 uneven shards (87 samples), 3 ranks x 3 dataloader workers: every rank gets the same number of
samples per epoch; ranks drawing batches in lockstep see every sample of the epoch exactly once,
except the documented remainder (fewer than world_size * batch_size samples, dropped at the end of
each epoch with drop_last=True); a state saved at one world size continues at another with every
sample of the epoch still seen exactly once."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
from shardset import build, shard_keys

from system.data import ShardReader

COUNTS = [6, 24, 8, 10, 19, 14, 6]  # 87 samples; the old whole-shard dealing gave ranks 48/29/10 (seed 7)
N = sum(COUNTS)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    return build(tmp_path_factory.mktemp("uneven7"), COUNTS)


def reader(url, **kw):
    args = dict(batch_size=2, resolution=8, seed=7)
    args.update(kw)
    return ShardReader(url, **args)


def lockstep(readers, steps):
    """Every rank draws `steps` batches, rank after rank per step (as the training loop does);
    returns per rank the (epoch, keys) of each batch."""
    its = [iter(r) for r in readers]
    out = [[] for _ in readers]
    for _ in range(steps):
        for rank, (r, it) in enumerate(zip(readers, its)):
            b = next(it)
            out[rank].append((r.epoch, list(b["key"])))
    return out


def test_uneven_shards_give_every_rank_the_same_share(uneven):
    url, all_keys = uneven
    per_rank = []
    for rank in range(3):
        r = reader(url, rank=rank, world_size=3, num_workers=3, drop_last=False)
        per_rank.append([k for b in r.one_epoch() for k in b["key"]])
    assert [len(k) for k in per_rank] == [N // 3] * 3, f"samples per rank per epoch: {[len(k) for k in per_rank]}"
    seen = Counter(k for keys in per_rank for k in keys)
    assert sorted(seen) == all_keys and set(seen.values()) == {1}


@pytest.mark.parametrize("batch_size", [2, 4])
def test_lockstep_epoch_sees_every_sample_once(uneven, batch_size):
    url, all_keys = uneven
    world, workers = 3, 3
    steps = N // (world * batch_size)  # batches per rank per epoch; the rest (< world * batch) is dropped
    readers = [reader(url, rank=r, world_size=world, num_workers=workers, batch_size=batch_size) for r in range(world)]
    got = lockstep(readers, steps + 1)
    for rank in range(world):
        assert [e for e, _ in got[rank]] == [0] * steps + [1], f"rank {rank}: epochs of its batches"
        assert all(len(k) == batch_size for _, k in got[rank])
    seen = Counter(k for rank in got for e, keys in rank if e == 0 for k in keys)
    twice = sorted(k for k, c in seen.items() if c > 1)
    unseen = sorted(set(all_keys) - set(seen))
    assert not twice, f"{len(twice)} samples seen more than once in one epoch: {twice}"
    assert len(unseen) == N - steps * world * batch_size < world * batch_size, f"{len(unseen)} of {N} unseen"


def test_world_size_change_2_to_3_ranks(uneven):
    """2 ranks x 2 workers read 5 batches of 4, save; 3 ranks x 1 worker with batches of 3 load the
    states and finish the epoch: every sample of the epoch exactly once, bar the documented
    remainder of the new layout (< 3 * 3)."""
    url, all_keys = uneven
    old = [reader(url, rank=r, world_size=2, num_workers=2, batch_size=4) for r in range(2)]
    first = lockstep(old, 5)
    states = [r.state_dict() for r in old]
    assert states[0]["consumed"] == states[1]["consumed"]  # the position is the same on every rank
    seen = Counter(k for rank in first for _, keys in rank for k in keys)
    assert sum(seen.values()) == 2 * 5 * 4
    new = [reader(url, rank=r, world_size=3, num_workers=1, batch_size=3) for r in range(3)]
    for r in new:
        r.load_state_dict(states[0])  # any old rank's state will do
    rest = (N - 40) // 9  # batches per new rank to the end of the epoch
    second = lockstep(new, rest + 1)
    for rank in second:
        assert [e for e, _ in rank] == [0] * rest + [1]
    seen.update(k for rank in second for e, keys in rank if e == 0 for k in keys)
    assert set(seen.values()) == {1}, "a sample was seen twice in one epoch"
    assert len(set(all_keys) - set(seen)) == (N - 40) - 9 * rest < 9


def test_world_size_change_without_drop_is_exact(uneven):
    """drop_last=False: 3 ranks -> 2 ranks (other workers and batch size): all 87 samples exactly once."""
    url, all_keys = uneven
    old = [reader(url, rank=r, world_size=3, num_workers=0, batch_size=5, drop_last=False) for r in range(3)]
    seen = Counter(k for rank in lockstep(old, 2) for _, keys in rank for k in keys)
    state = old[2].state_dict()
    for rank in range(2):
        r = reader(url, rank=rank, world_size=2, num_workers=2, batch_size=4, drop_last=False)
        r.load_state_dict(state)
        seen.update(k for b in r.one_epoch() for k in b["key"])
    assert sorted(seen) == all_keys and set(seen.values()) == {1}


def truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """The 7 uneven shards with shard 1 truncated to half its bytes and shard 4 gone."""
    root = tmp_path_factory.mktemp("damaged")
    url, all_keys = build(root, COUNTS)
    truncate(root / "train/train-000001.tar", 0.5)
    os.remove(root / "train/train-000004.tar")
    gone = set(shard_keys(COUNTS)[4])
    return url, all_keys, gone


@pytest.mark.parametrize("world,workers,batch_size", [(3, 3, 2), (2, 2, 3), (1, 0, 4)])
def test_unreadable_shards_are_skipped_on_every_layout(damaged, world, workers, batch_size):
    """No error, every rank the same number of full batches per epoch; a bad sample's place is
    taken by another readable sample of the epoch (seen twice, or once when it is one of the
    dropped remainder); each bad sample counted once."""
    url, all_keys, gone = damaged
    steps = N // (world * batch_size)
    readers = [reader(url, rank=r, world_size=world, num_workers=workers, batch_size=batch_size, chunk_size=8)
               for r in range(world)]
    got = lockstep(readers, steps)
    bad = sum(r.skipped for r in readers)  # the ranks' planned samples are disjoint in an epoch
    for rank in got:
        assert [e for e, _ in rank] == [0] * steps and all(len(k) == batch_size for _, k in rank)
    seen = Counter(k for rank in got for _, keys in rank for k in keys)
    assert not set(seen) & gone
    assert bad >= len(gone) - (N - steps * world * batch_size)  # the missing shard, bar what the remainder took
    planned, dropped = steps * world * batch_size, N - steps * world * batch_size
    assert max(seen.values()) <= 2  # a sample's own place and one substitution at most
    assert planned - bad <= len(seen) <= planned - bad + dropped  # readable planned samples + substitutes from the rest
    assert sum(seen.values()) == steps * world * batch_size
    more = lockstep(readers, 1)  # and on into the next epoch
    assert all(rank[0][0] == 1 for rank in more)


def test_a_rank_whose_whole_share_is_unreadable_keeps_step(tmp_path):
    """3 shards of 10, one chunk each, 3 ranks x 1 worker: each rank's epoch is exactly one shard.
    With one shard gone, its rank still yields its 5 batches (10 different readable samples of the
    other shards), so the ranks stay in step; with drop_last=False it yields nothing."""
    url, _ = build(tmp_path, [10, 10, 10])
    os.remove(tmp_path / "train/train-000001.tar")
    gone = set(shard_keys([10, 10, 10])[1])
    readers = [reader(url, rank=r, world_size=3, num_workers=0, batch_size=2, chunk_size=10) for r in range(3)]
    got = lockstep(readers, 5 + 1)
    assert all([e for e, _ in rank] == [0] * 5 + [1] for rank in got)
    skipped = [r.skipped for r in readers]
    victim = skipped.index(10)
    assert sorted(skipped) == [0, 0, 10]
    drawn = Counter(k for rank in got for _, keys in rank[:5] for k in keys)
    assert not set(drawn) & gone and len({k for _, keys in got[victim][:5] for k in keys}) == 10
    assert sorted(drawn) == sorted(set(shard_keys([10, 10, 10])[0] + shard_keys([10, 10, 10])[2]))
    assert sorted(drawn.values()) == [1] * 10 + [2] * 10  # each readable sample stands in once at most
    val = [reader(url, rank=r, world_size=3, num_workers=0, batch_size=4, chunk_size=10, drop_last=False) for r in range(3)]
    counts = [len([k for b in v.one_epoch() for k in b["key"]]) for v in val]
    assert sorted(counts) == [0, 10, 10]


def test_unreadable_last_shard_without_drop_last_stays_in_its_epoch(tmp_path):
    url, all_keys = build(tmp_path, COUNTS)
    truncate(tmp_path / "train/train-000006.tar", 0.0)  # the last shard: an empty object
    readable = sorted(set(all_keys) - set(shard_keys(COUNTS)[6]))
    r = reader(url, batch_size=4, num_workers=2, drop_last=False)
    for epoch in range(2):
        keys = [k for b in r.one_epoch() for k in b["key"]]
        assert r.epoch == epoch and sorted(keys) == readable  # once each, nothing of the next epoch
    assert r.skipped == COUNTS[6]


def test_layout_changes_twice_in_one_epoch(uneven):
    """3 ranks -> 2 ranks -> 4 ranks within epoch 0 (drop_last=False): every sample exactly once."""
    url, all_keys = uneven
    layouts = [(3, 1, 4, 2), (2, 2, 3, 2), (4, 0, 2, None)]  # (world, workers, batch, lockstep steps; None: to the end)
    seen, state = Counter(), None
    for world, workers, batch_size, steps in layouts:
        rs = [reader(url, rank=r, world_size=world, num_workers=workers, batch_size=batch_size, drop_last=False,
                     chunk_size=5) for r in range(world)]
        for r in rs:
            if state is not None:
                r.load_state_dict(state)
        if steps is None:
            for r in rs:
                seen.update(k for b in r.one_epoch() for k in b["key"])
        else:
            seen.update(k for rank in lockstep(rs, steps) for _, keys in rank for k in keys)
            state = rs[-1].state_dict()
    assert sorted(seen) == all_keys and set(seen.values()) == {1}


@pytest.mark.parametrize("drop_last", [True, False])
def test_plan_deals_every_position_once(drop_last):
    """Plan arithmetic over many layouts, with and without positions consumed before."""
    from system.data.plan import Layout, Plan, merge, total

    for n, base in ((87, []), (87, [[3, 9], [40, 41], [80, 87]]), (23, [[0, 1]])):
        for world, workers, batch in ((1, 1, 4), (3, 3, 2), (2, 4, 3), (4, 2, 5), (3, 5, 1)):
            plan = Plan(n, merge(base), Layout(world, workers, batch, drop_last), seed=0, epoch=0)
            left = n - total(merge(base))
            ranges = []
            for r in range(world):
                t = plan.num_batches(r)
                if drop_last:
                    assert t == left // (world * batch)
                slots = [plan.slot_range(r, s) for s in range(workers)]
                assert all(a <= e for a, e in slots) and all(x[1] == y[0] for x, y in zip(slots, slots[1:]))
                assert sum(e - a for a, e in slots) == plan.shares[r]
                ranges += slots
            used = merge([iv for a, e in ranges for iv in plan.rem.intervals(a, e)])
            assert not any(a < y and x < e for a, e in used for x, y in merge(base))  # nothing consumed before
            dropped = left - total(used)
            assert dropped == (left % (world * batch) if drop_last else 0)
            t_max = max(plan.num_batches(r) for r in range(world))
            assert plan.consumed(t_max) == merge(base + used) and plan.consumed(0) == merge(base)


GARBAGE_COUNTS = [6, 24, 8, 10, 19, 12, 6]  # 85 = 2 ranks x 5 batches x 4 + 3 ranks x 5 batches x 3


@pytest.fixture(scope="module")
def garbage(tmp_path_factory):
    """7 uneven shards, shard 4 overwritten with random bytes (markers intact) and shard 0 gone:
    25 of 85 samples unreadable."""
    root = tmp_path_factory.mktemp("garbage")
    url, all_keys = build(root, GARBAGE_COUNTS)
    tar = root / "train/train-000004.tar"
    tar.write_bytes(np.random.default_rng(0).integers(0, 256, tar.stat().st_size, dtype=np.uint8).tobytes())
    os.remove(root / "train/train-000000.tar")
    keys = shard_keys(GARBAGE_COUNTS)
    return url, all_keys, set(keys[0] + keys[4])


def bad_ids(r):
    return {i for iv in r.state_dict()["bad"].values() for a, b in iv for i in range(a, b)}


@pytest.mark.parametrize("loader", ["rank 0", "own"])
def test_skipped_is_exact_across_a_resize(garbage, loader):
    """2 ranks read 5 batches of 4, 3 ranks finish the epoch (5 batches of 3, nothing dropped).
    Every readable sample once in its place, each unreadable place filled by a different sample;
    no bad sample counted by two ranks. "rank 0": every new rank loads rank 0's state (as
    cluster/checkpoint.py does): new rank 0 carries its ids, old rank 1's count ends with it;
    "own": new ranks 0 and 1 load their old rank's state: the new ranks' counts are the total."""
    url, all_keys, bad = garbage
    old = [reader(url, rank=r, world_size=2, num_workers=2, batch_size=4, chunk_size=8) for r in range(2)]
    first = lockstep(old, 5)
    states = [r.state_dict() for r in old]
    new = [reader(url, rank=r, world_size=3, num_workers=1, batch_size=3, chunk_size=8) for r in range(3)]
    for rank, r in enumerate(new):
        r.load_state_dict(states[0] if loader == "rank 0" or rank >= 2 else states[rank])
    second = lockstep(new, 5)
    assert all(e == 0 for rank in second for e, _ in rank)
    seen = Counter(k for rank in first + second for _, keys in rank for k in keys)
    assert sum(seen.values()) == 85 and set(seen) == set(all_keys) - bad
    assert max(seen.values()) == 2 and sum(c - 1 for c in seen.values()) == len(bad)
    ids = [bad_ids(r) for r in new]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert ids[0] >= bad_ids(old[0]) and not (ids[1] | ids[2]) & bad_ids(old[0])
    ended = old[1].skipped if loader == "rank 0" else 0  # the count of a state no new rank continues
    assert sum(r.skipped for r in new) + ended == len(bad)


def test_unreadable_data_gives_the_same_epoch_on_every_layout(garbage):
    """Layouts that drop nothing (85 = 5 x 17) draw the same samples, substitutes included."""
    url, _, bad = garbage
    runs = []
    for world, workers, batch_size in ((1, 2, 5), (5, 0, 1), (1, 0, 17)):
        rs = [reader(url, rank=r, world_size=world, num_workers=workers, batch_size=batch_size, chunk_size=8)
              for r in range(world)]
        runs.append(Counter(k for rank in lockstep(rs, 85 // (world * batch_size)) for _, keys in rank for k in keys))
    assert runs[0] == runs[1] == runs[2]
    assert sorted(runs[0].values()) == [1] * (85 - 2 * len(bad)) + [2] * len(bad)
