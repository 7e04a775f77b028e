"""The epoch plan on its own (system/data/plan.py), many ranks simulated in one process (issue 23):
substitutes for unreadable samples spread over the epoch (no sample drawn more than twice, the same
on every layout), and a dropped remainder that is uniform over the epoch's samples."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from system.data.plan import EpochOrder, Layout, Plan, Substitutes, build_chunks


def index(counts):
    return build_chunks([{"name": f"s{i}", "count": c} for i, c in enumerate(counts)])[1]


def draws(counts, readable, layout, seed, epoch=0):
    """Every rank's whole epoch (lockstep to the end): Counter of the ids drawn, each unreadable
    planned sample replaced by its substitute, as the reader does."""
    chunks = index(counts)
    n = sum(counts)
    plan = Plan(n, [], layout, seed=seed, epoch=epoch)
    order, subs = EpochOrder(chunks, seed, epoch), Substitutes(n, seed, epoch, readable)
    out, per_rank = Counter(), []
    for rank in range(layout.world_size):
        mine = Counter()
        for slot in range(layout.workers):
            a, e = plan.slot_range(rank, slot)
            mine.update(x if readable(x) else subs.of(x) for x in map(int, order.ids(plan.rem.positions(a, e))))
        out.update(mine)
        per_rank.append(mine)
    planned = set(range(n)) - set(map(int, order.ids(plan.dropped)))
    return out, per_rank, planned


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("garbage", [0, 2])
def test_a_garbage_shard_at_32_ranks_is_spread(workers, garbage):
    """4 shards of 250, one of them garbage, 32 ranks x batch 4 (the issue: one image was 250 of the
    896 draws and 8 ranks saw nothing else): no sample more than twice, every readable planned
    sample at least once, every rank sees many different samples."""
    counts = [250] * 4
    bad = set(range(250 * garbage, 250 * garbage + 250))
    readable = lambda x: x not in bad  # noqa: E731
    got, per_rank, planned = draws(counts, readable, Layout(32, workers, 4, True), seed=5)
    assert sum(got.values()) == 32 * 7 * 4 == 896
    assert not set(got) & bad and max(got.values()) == 2
    assert {x for x in planned if readable(x)} <= set(got)  # every readable planned sample drawn
    assert sum(c - 1 for c in got.values()) <= len(planned & bad)  # the repeats are the substitutes
    assert min(len(r) for r in per_rank) >= 24  # 28 draws per rank: no rank stuck on one image
    shards = Counter(x // 250 for x, c in got.items() if c == 2)
    assert len(shards) == 3 and min(shards.values()) > 30  # substitutes from every readable shard


def test_substitutes_do_not_depend_on_the_layout():
    """Layouts that drop nothing draw the same multiset of samples: the substitute of a sample
    depends on (seed, epoch, which samples are readable) only."""
    counts = [30, 30, 30, 30]  # 120 samples
    bad = set(range(30, 60)) | {3, 77, 100}
    readable = lambda x: x not in bad  # noqa: E731
    runs = [draws(counts, readable, Layout(w, k, b, True), seed=9, epoch=2)[0]
            for w, k, b in ((8, 1, 3), (5, 2, 4), (3, 4, 5), (1, 1, 8))]
    assert all(r == runs[0] for r in runs[1:])
    assert sorted(runs[0].values()) == [1] * (120 - 2 * len(bad)) + [2] * len(bad)
    other_epoch = draws(counts, readable, Layout(8, 1, 3, True), seed=9, epoch=3)[0]
    assert other_epoch != runs[0]  # other substitutes each epoch


@pytest.mark.parametrize("share", [0.1, 0.3, 0.4, 0.5])
def test_substitutes_are_distinct_while_less_than_half_is_unreadable(share):
    rng = np.random.default_rng(int(share * 10))
    n = 4000
    bad = set(map(int, rng.choice(n, int(share * n), replace=False)))
    subs = Substitutes(n, 1, 0, lambda x: x not in bad)
    got = [subs.of(x) for x in sorted(bad)]
    assert not set(got) & bad
    if share < 0.5:
        assert len(set(got)) == len(got) and not subs.crowded
    else:  # half: long walks are cut, a few substitutes repeat
        assert len(set(got)) > 0.95 * len(got)


def test_mostly_unreadable_epochs_still_get_substitutes():
    n = 500
    bad = set(range(0, 450))
    subs = Substitutes(n, 1, 0, lambda x: x not in bad)
    got = Counter(subs.of(x) for x in bad)
    assert set(got) <= set(range(450, 500)) and subs.crowded  # more bad than readable: some stand in twice
    nothing = Substitutes(10, 1, 0, lambda x: False)
    assert nothing.of(3) is None and nothing.first() is None


def test_dropped_remainder_is_uniform_over_samples():
    """7 uneven shards (87 samples), 3 ranks x batch 4: 3 samples dropped per epoch. Over 3000
    epochs (3 seeds) every shard's samples are dropped at the uniform rate (within 15 %; the old
    tail-of-the-order remainder dropped small shards' samples twice as often), no sample much more
    than others, and consecutive epochs drop unrelated sets."""
    counts = [6, 24, 8, 10, 19, 14, 6]
    n, chunks = sum(counts), index(counts)
    shard_of = np.repeat(np.arange(len(counts)), counts)
    per_sample, repeats, epochs = np.zeros(n), 0, 0
    for seed in range(3):
        prev: set = set()
        for epoch in range(1000):
            plan = Plan(n, [], Layout(3, 2, 4, True), seed=seed, epoch=epoch)
            ids = set(map(int, EpochOrder(chunks, seed, epoch).ids(plan.dropped)))
            assert len(ids) == n % 12
            per_sample[list(ids)] += 1
            repeats += len(ids & prev)
            prev, epochs = ids, epochs + 1
    uniform = epochs * (n % 12) / n
    rate = [per_sample[shard_of == s].mean() / uniform for s in range(len(counts))]
    assert all(0.85 < r < 1.15 for r in rate), rate
    assert per_sample.min() > 0.6 * uniform and per_sample.max() < 1.4 * uniform
    assert repeats < 0.3 * epochs  # ~ 3 * 3 / 87 per epoch by chance


def test_dropped_remainder_after_a_resize_is_uniform_over_what_is_left():
    n = 87
    base = [[0, 10], [40, 61]]
    hits = Counter()
    for seed in range(400):
        plan = Plan(n, base, Layout(3, 1, 5, True), seed=seed, epoch=0)
        assert len(plan.dropped) == (n - 31) % 15 and not any(a <= p < b for p in plan.dropped for a, b in base)
        hits.update(map(int, plan.dropped))
    assert len(hits) == n - 31  # every remaining position is dropped sometimes, none consumed before
