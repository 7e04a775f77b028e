"""The shard reader: chunks, exact resume, state checks, fraction, unreadable data (corrupt
samples, truncated and missing shards), errors that name what is wrong. Partition guarantees on
uneven shards and world-size changes: test_partition.py; prefetch, ranged reads: test_prefetch.py."""
import io
import json
import logging
import os
from collections import Counter

import pytest
import torch
from shardset import build, shard_keys

from system.config import StorageConfig
from system.data import ShardReader, StorageError
from system.data.plan import build_chunks
from system.data.shards import iter_tar_samples


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    return build(tmp_path_factory.mktemp("uneven"), [10, 10, 7])


def reader(url, **kw):
    args = dict(batch_size=2, resolution=8, seed=7)
    args.update(kw)
    return ShardReader(url, **args)


def test_chunks_cut_shards_into_near_equal_pieces():
    shards, chunks = build_chunks([{"name": "a", "count": 10}, {"name": "b", "count": 7}], chunk_size=4)
    assert shards == [("a", 10), ("b", 7)]
    assert [(c.shard, c.start, c.size, c.first) for c in chunks] == [
        (0, 0, 3, 0), (0, 3, 4, 3), (0, 7, 3, 7), (1, 0, 4, 10), (1, 4, 3, 14)]
    shards, chunks = build_chunks([{"name": "a", "count": 10}, {"name": "b", "count": 7}], fraction=0.5)
    assert shards == [("a", 10)] and [(c.start, c.size) for c in chunks] == [(0, 9)]  # ceil(8.5) samples
    with pytest.raises(ValueError, match="fraction"):
        build_chunks([{"name": "a", "count": 3}], fraction=0)


@pytest.mark.parametrize("world_size,num_workers", [(2, 2), (3, 0)])
def test_exactly_once_across_restart(uneven, world_size, num_workers):
    url, all_keys = uneven
    seen = []
    for rank in range(world_size):
        first = reader(url, rank=rank, world_size=world_size, num_workers=num_workers, drop_last=False, chunk_size=4)
        it = first.one_epoch()
        seen += [k for _, b in zip(range(2), it) for k in b["key"]]
        state = first.state_dict()
        again = reader(url, rank=rank, world_size=world_size, num_workers=num_workers, drop_last=False, chunk_size=4)
        again.load_state_dict(state)
        seen += [k for b in again.one_epoch() for k in b["key"]]
    assert not [k for k, c in Counter(seen).items() if c > 1], "a sample was repeated"
    assert sorted(seen) == all_keys


def test_resume_reproduces_uninterrupted_batches(uneven):
    url, _ = uneven
    kw = dict(rank=1, world_size=2, num_workers=2, batch_size=3, chunk_size=4)  # 4 batches per rank per epoch
    full = []
    for b in reader(url, **kw):
        full.append(b)
        if len(full) == 12:
            break
    first = reader(url, **kw)
    part = []
    for b in first:
        part.append(b)
        if len(part) == 5:  # odd: the next batch comes from the rank's other worker
            break
    state = json.loads(json.dumps(first.state_dict()))  # as plain as a checkpoint needs
    assert (state["epoch"], state["batches"]) == (1, 1) and first.epoch == 1
    second = reader(url, **kw)
    second.load_state_dict(state)
    for b in second:
        part.append(b)
        if len(part) == 12:
            break
    assert [b["key"] for b in part] == [b["key"] for b in full]
    for a, b in zip(part, full):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    for e in range(3):  # an epoch: 12 different samples (its share changes from epoch to epoch)
        assert len({k for b in full[4 * e : 4 * e + 4] for k in b["key"]}) == 12
    assert [b["key"] for b in full[:4]] != [b["key"] for b in full[4:8]]


def test_state_mismatch_is_an_error(uneven):
    url, _ = uneven
    state = reader(url, world_size=2, num_workers=2).state_dict()
    reader(url, rank=1, world_size=3, num_workers=1, batch_size=3).load_state_dict(state)  # another layout: fine
    with pytest.raises(ValueError, match="seed=7 but this reader has seed=8"):
        reader(url, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="fraction"):
        reader(url, fraction=0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="chunk_size"):
        reader(url, chunk_size=3).load_state_dict(state)
    old = {"positions": {0: [0, 1, 0]}, "skipped": {0: 0}, "next_stream": 0, "seed": 7}  # the per-stream format
    with pytest.raises(ValueError, match="older format"):
        reader(url).load_state_dict(old)


def test_state_saved_before_the_uniform_remainder_is_re_dealt(uneven):
    """A state without "deal" (saved when the remainder was the tail of the order) continues from
    its consumed positions dealt afresh, every sample of the epoch still once; its unkeyed bad ids
    are the loading rank's own on the same layout (each rank loads its own state), rank 0's after
    a resize."""
    url, _ = uneven
    old = [reader(url, rank=r, world_size=2, num_workers=0) for r in range(2)]
    its = [iter(r) for r in old]
    seen = [k for _ in range(2) for it in its for k in next(it)["key"]]
    state = {**old[0].state_dict(), "bad": [[3, 5]]}
    del state["deal"]
    new = [reader(url, rank=r, world_size=2, num_workers=0) for r in range(2)]
    for r in new:
        r.load_state_dict(state)
    assert new[0].state_dict()["base"] == state["consumed"] and new[0].state_dict()["batches"] == 0
    assert [r.state_dict()["bad"] for r in new] == [{"0": [[3, 5]]}, {"1": [[3, 5]]}]
    rest = (27 - 8) // 4
    its = [iter(r) for r in new]
    seen += [k for _ in range(rest) for it in its for k in next(it)["key"]]
    assert len(seen) == len(set(seen)) == 8 + 4 * rest and new[0].epoch == 0
    resized = [reader(url, rank=r, world_size=3, num_workers=0) for r in range(3)]
    for r in resized:
        r.load_state_dict(state)
    assert [r.skipped for r in resized] == [2, 0, 0]


def test_state_is_the_same_on_every_rank(uneven):
    url, _ = uneven
    rs = [reader(url, rank=r, world_size=3, num_workers=0, batch_size=2) for r in range(3)]
    its = [iter(r) for r in rs]
    for _ in range(2):
        for it in its:
            next(it)
    states = [r.state_dict() for r in rs]
    assert states[0] == states[1] == states[2]
    assert states[0]["consumed"] and sum(b - a for a, b in states[0]["consumed"]) == 3 * 2 * 2


def test_fraction_is_a_deterministic_subset(uneven):
    url, all_keys = uneven
    r = reader(url, fraction=0.5, drop_last=False, num_workers=0)
    assert r.num_samples == 14
    seen = [k for b in r.one_epoch() for k in b["key"]]
    assert len(seen) == 14 and set(seen) < set(all_keys)
    again = [k for b in reader(url, fraction=0.5, drop_last=False, seed=99, num_workers=2).one_epoch() for k in b["key"]]
    assert sorted(again) == sorted(seen)  # same subset whatever the order seed and workers


def test_too_little_data_for_one_batch_per_rank(uneven):
    url, _ = uneven
    with pytest.raises(ValueError, match="27 samples.*4 rank.*one batch of 8"):
        reader(url, world_size=4, rank=0, batch_size=8)
    reader(url, world_size=4, rank=0, batch_size=8, drop_last=False)  # validation: any batch size


def truncate(path, keep=0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return [k for k, f in iter_tar_samples(io.BytesIO(path.read_bytes())) if f is not None]


def test_corrupt_image_and_truncated_tar_are_skipped(tmp_path, caplog):
    url, all_keys = build(tmp_path, [8, 8], corrupt={"s003"})
    readable = truncate(tmp_path / "train/train-000001.tar")
    assert 0 < len(readable) < 8
    r = reader(url, drop_last=False, num_workers=0, chunk_size=3)  # chunks inside the truncated shard: ranged reads
    with caplog.at_level(logging.WARNING):
        seen = [k for b in r.one_epoch() for k in b["key"]]
    expected = [f"s{i:03d}" for i in range(8) if i != 3] + readable
    assert sorted(seen) == sorted(expected)
    assert r.skipped == 1 + 8 - len(readable)  # distinct samples that could not be read
    assert r.state_dict()["skipped"] == r.skipped
    text = caplog.text
    assert "'s003'" in text and "train-000000.tar" in text  # corrupt image: key and shard
    assert "train-000001.tar" in text and "truncated" in text


def test_skipped_counts_distinct_samples_once(tmp_path):
    """Three epochs, a restart that re-reads batches (a retried step): each bad sample counts once."""
    counts = [8, 8]
    url, _ = build(tmp_path, counts, corrupt={"s003", "s010"})
    readable = truncate(tmp_path / "train/train-000001.tar", keep=0.5)
    bad = 2 + 8 - len(readable) - ("s010" not in readable)  # s010 may be in the lost part itself
    kw = dict(drop_last=True, num_workers=0, batch_size=2, chunk_size=4)
    r = reader(url, **kw)
    it = iter(r)
    for _ in range(3):
        next(it)
    state = r.state_dict()
    for _ in range(3 * 8 - 3):  # to the end of epoch 2 (8 batches per epoch)
        next(it)
    assert r.epoch == 2 and r.skipped == bad
    again = reader(url, **kw)
    again.load_state_dict(state)
    it = iter(again)
    for _ in range(3 * 8 - 3):
        next(it)
    assert again.skipped == bad and again.state_dict()["bad"] == r.state_dict()["bad"]


def test_missing_shards(tmp_path, caplog):
    url, _ = build(tmp_path, [4, 4])
    os.remove(tmp_path / "train/train-000001.tar")
    with caplog.at_level(logging.WARNING):
        r = reader(url, drop_last=False)  # one shard gone: its samples are skipped, named in a warning
    assert str(tmp_path / "train/train-000001.tar") in caplog.text
    assert sorted(k for b in r.one_epoch() for k in b["key"]) == shard_keys([4, 4])[0] and r.skipped == 4
    os.remove(tmp_path / "train/train-000000.tar")
    with pytest.raises(FileNotFoundError, match="all 2 shard.*missing: " + str(tmp_path / "train/train-000000.tar")):
        reader(url)
    url2, _ = build(tmp_path / "b", [4, 4])
    rs = [reader(url2, num_workers=0), reader(url2, num_workers=0, drop_last=False)]
    os.remove(tmp_path / "b/train/train-000000.tar")  # disappear after the readers started
    os.remove(tmp_path / "b/train/train-000001.tar")
    for r in rs:
        with pytest.raises(RuntimeError, match="no readable samples in " + str(tmp_path / "b/train")):
            next(iter(r))


def test_missing_index_and_bad_endpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none" / "index.json")):
        reader(str(tmp_path / "none"))
    st = StorageConfig(endpoint_url="http://127.0.0.1:9", max_attempts=1)
    with pytest.raises(StorageError, match=r"s3://bucket/imagenet/train/index\.json.*127\.0\.0\.1:9"):
        reader("s3://bucket/imagenet/train", storage=st)


def test_fast_tar_parser_agrees_with_tarfile(tmp_path):
    """The reader parses in-memory tars itself; at any truncation point it keeps exactly the complete
    samples `iter_tar_samples` (tarfile) keeps, and leaves tars with pax headers to tarfile."""
    import tarfile

    from system.data.tario import _tar_samples, _UseTarfile
    from system.data.shards import image_complete

    build(tmp_path, [6])
    data = (tmp_path / "train/train-000000.tar").read_bytes()

    def complete(samples):
        return [(k, f) for k, f in samples if f is not None and image_complete(f)]

    for cut in list(range(0, len(data), 37)) + [len(data)]:
        fast = list(_tar_samples(data[:cut], image_complete))
        slow = list(iter_tar_samples(io.BytesIO(data[:cut]), "", image_complete))
        assert complete(fast) == complete(slow), f"cut at byte {cut}"
    whole = list(_tar_samples(data, image_complete))
    assert len(whole) == 6 and len(complete(whole)) == 6
    assert list(_tar_samples(data[: len(data) // 2], image_complete))[-1][1] is None  # cut: ends with the marker
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in (("k.jpg", b"x"), ("k.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(payload), {"comment": "pax"}
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(_UseTarfile):
        _tar_samples(buf.getvalue(), image_complete)
