import io
import logging
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from system.config import StorageConfig
from system.data import ShardReader, StorageError, plan_shards, write_index, write_shard
from system.data.reader import build_units
from system.data.shards import iter_tar_samples


def jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def build(root, counts, corrupt=()):
    """Shard set with the given per-shard sample counts; keys in `corrupt` get garbage bytes."""
    n = sum(counts)
    its = [(b"garbage" if f"s{i:03d}" in corrupt else jpeg(i), f"s{i:03d}", i % 5) for i in range(n)]
    plans, start = [], 0
    for j, c in enumerate(counts):  # exact counts per shard (plan_shards makes equal ones)
        p = plan_shards(its[start : start + c], "train", shard_size=c, seed=j)[0]
        p.name = f"train-{j:06d}.tar"
        plans.append(p)
        start += c
    for p in plans:
        write_shard(p, str(root))
    write_index(plans, str(root), {f"c{i}": i for i in range(5)})
    return str(root / "train"), sorted(k for _, k, _ in its)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    return build(tmp_path_factory.mktemp("uneven"), [10, 10, 7])  # fewer shards than 4 streams


def reader(url, **kw):
    args = dict(batch_size=2, resolution=8, seed=7)
    args.update(kw)
    return ShardReader(url, **args)


def take_epoch0(r, keys, stop_after=None):
    """Consume batches; collect epoch-0 keys; stop after `stop_after` batches or once every
    stream of this rank has finished epoch 0. Returns the number of batches consumed."""
    n = 0
    for b in r:
        if r.epoch == 0:
            keys += b["key"]
        n += 1
        if n == stop_after or all(p[0] >= 1 for p in r.state_dict()["positions"].values()):
            break
    return n


def test_units_slice_shards_for_streams():
    units = build_units([{"name": "a", "count": 10}, {"name": "b", "count": 7}], num_streams=4)
    assert [(u.shard, u.start, u.end) for u in units] == [("a", 0, 5), ("a", 5, 10), ("b", 0, 4), ("b", 4, 7)]
    assert len(build_units([{"name": "a", "count": 10}] * 5, num_streams=4)) == 5
    with pytest.raises(ValueError, match="streams"):
        build_units([{"name": "a", "count": 3}], num_streams=4)


@pytest.mark.parametrize("world_size,num_workers", [(2, 2), (3, 0)])
def test_exactly_once_across_restart(uneven, world_size, num_workers):
    url, all_keys = uneven
    seen = []
    for rank in range(world_size):
        first = reader(url, rank=rank, world_size=world_size, num_workers=num_workers, drop_last=False)
        assert take_epoch0(first, seen, stop_after=3) == 3
        state = first.state_dict()
        again = reader(url, rank=rank, world_size=world_size, num_workers=num_workers, drop_last=False)
        again.load_state_dict(state)
        take_epoch0(again, seen)
    assert not [k for k, c in Counter(seen).items() if c > 1], "a sample was repeated"
    assert sorted(seen) == all_keys


def test_resume_reproduces_uninterrupted_batches(uneven):
    url, _ = uneven
    kw = dict(rank=1, world_size=2, num_workers=2, batch_size=3)  # batches span units and epochs
    full = []
    for b in reader(url, **kw):
        full.append(b)
        if len(full) == 12:
            break
    first = reader(url, **kw)
    part = []
    for b in first:
        part.append(b)
        if len(part) == 5:  # odd: the next batch comes from the rank's second stream
            break
    state = first.state_dict()
    assert state["next_stream"] == 3
    second = reader(url, **kw)
    second.load_state_dict(state)
    for b in second:
        part.append(b)
        if len(part) == 12:
            break
    assert [b["key"] for b in part] == [b["key"] for b in full]
    for a, b in zip(part, full):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert len({k for b in full for k in b["key"]}) < 36  # 12 x 3 > 13 samples per rank: wrapped epochs


def test_state_mismatch_is_an_error(uneven):
    url, _ = uneven
    state = reader(url, world_size=2, num_workers=2).state_dict()
    with pytest.raises(ValueError, match="num_workers"):
        reader(url, world_size=2, num_workers=1).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        reader(url, world_size=1, num_workers=2).load_state_dict(state)
    with pytest.raises(ValueError, match="same rank"):
        reader(url, rank=1, world_size=2, num_workers=2).load_state_dict(state)


def test_fraction_is_a_deterministic_subset(uneven):
    url, all_keys = uneven
    r = reader(url, fraction=0.5, drop_last=False, num_workers=0)
    assert r.num_samples == 14
    seen = []
    take_epoch0(r, seen)
    assert len(seen) == 14 and set(seen) < set(all_keys)
    again = [k for b in reader(url, fraction=0.5, drop_last=False, seed=99, num_workers=2).one_epoch() for k in b["key"]]
    assert sorted(again) == sorted(seen)  # same subset whatever the order seed and workers


def test_corrupt_image_and_truncated_tar_are_skipped(tmp_path, caplog):
    url, all_keys = build(tmp_path, [8, 8], corrupt={"s003"})
    tar = tmp_path / "train/train-000001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: int(len(data) * 0.6)])
    readable = [k for k, f in iter_tar_samples(io.BytesIO(tar.read_bytes())) if f is not None]
    assert 0 < len(readable) < 8
    r = reader(url, drop_last=False, num_workers=0)
    seen = []
    with caplog.at_level(logging.WARNING):
        take_epoch0(r, seen)
    expected = [f"s{i:03d}" for i in range(8) if i != 3] + readable
    assert sorted(seen) == sorted(expected)
    assert r.skipped == 2 and r.state_dict()["skipped"] == {0: 2}
    text = caplog.text
    assert "'s003'" in text and "train-000000.tar" in text  # corrupt image: key and shard
    assert "train-000001.tar" in text and "truncated" in text


def test_missing_shard_names_url(tmp_path):
    url, _ = build(tmp_path, [4, 4])
    os.remove(tmp_path / "train/train-000001.tar")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train/train-000001.tar")):
        reader(url)
    url2, _ = build(tmp_path / "b", [4, 4])
    r = reader(url2, num_workers=0, drop_last=False)
    os.remove(tmp_path / "b/train/train-000000.tar")  # disappears after the reader started
    os.remove(tmp_path / "b/train/train-000001.tar")
    with pytest.raises(FileNotFoundError, match="shard listed in the index is missing: " + str(tmp_path / "b/train")):
        next(iter(r))


def test_missing_index_and_bad_endpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none" / "index.json")):
        reader(str(tmp_path / "none"))
    st = StorageConfig(endpoint_url="http://127.0.0.1:9", max_attempts=1)
    with pytest.raises(StorageError, match=r"s3://bucket/imagenet/train/index\.json.*127\.0\.0\.1:9"):
        reader("s3://bucket/imagenet/train", storage=st)
