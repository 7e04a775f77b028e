"""Reading: the next chunk is fetched in a background thread while the current one is decoded;
chunks inside a shard are single ranged reads (offsets in the shard's marker), also on S3; shards
written without offsets still read; pin_memory."""
from __future__ import annotations

import json
import threading
from collections import Counter

import pytest
import torch
from shardset import build

import system.data.tario as tario
from system.config import DataConfig, StorageConfig
from system.data import ShardReader, filesystem
from system.data.codec import ImageCodec


def reader(url, **kw):
    args = dict(batch_size=4, resolution=8, seed=3, num_workers=0)
    args.update(kw)
    return ShardReader(url, **args)


@pytest.mark.parametrize("prefetch", [True, False])
def test_next_chunk_is_fetched_while_the_current_one_decodes(tmp_path, monkeypatch, prefetch):
    url, _ = build(tmp_path, [8, 8])  # chunk_size 8: two chunks, one per shard
    fetches, second_started = [], threading.Event()
    real_read, real_decode = tario.read_samples, ImageCodec.decode

    def read(spec, shard, lo, hi):
        fetches.append((shard, threading.current_thread().name))
        if len(fetches) == 2:
            second_started.set()
        return real_read(spec, shard, lo, hi)

    waited = []

    def decode(self, key, fields, epoch):
        if not waited:  # the first sample of the first chunk: has the second chunk's fetch begun?
            waited.append(second_started.wait(timeout=2.0 if prefetch else 0.3))
        return real_decode(self, key, fields, epoch)

    monkeypatch.setattr(tario, "read_samples", read)
    monkeypatch.setattr(ImageCodec, "decode", decode)
    r = reader(url, batch_size=16, chunk_size=8, prefetch=prefetch)
    keys = next(iter(r))["key"]
    assert len(set(keys)) == 16
    assert waited == [prefetch]
    assert len(fetches) == 2 and all(name.startswith("shard-prefetch") == prefetch for _, name in fetches)


@pytest.fixture
def s3_shards(s3_server, tmp_path):
    st = StorageConfig(endpoint_url=s3_server)
    fs, _ = filesystem("s3://x", st)
    bucket = f"prefetch-{abs(hash(str(tmp_path))) % 10**8}"
    fs.mkdir(bucket)
    url, keys = build(f"s3://{bucket}/set", [13, 9, 11], storage=st)
    return url, keys, st


def test_ranged_chunk_reads_on_s3(s3_shards, monkeypatch):
    url, all_keys, st = s3_shards
    marker = json.loads(filesystem(url, st)[0].cat_file(url.split("://")[1] + "/train-000000.tar.done.json"))
    assert len(marker["offsets"]) == 13 + 1 and marker["offsets"][0] == 0
    ranges = []
    real_cat = tario.filesystem

    def spying_filesystem(u, storage=None):
        fs, path = real_cat(u, storage)
        cat = fs.cat_file

        def cat_file(p, start=None, end=None, **kw):
            if p.endswith(".tar"):
                ranges.append((p.rsplit("/", 1)[-1], start, end))
            return cat(p, start=start, end=end, **kw)

        fs.cat_file = cat_file
        return fs, path

    monkeypatch.setattr(tario, "filesystem", spying_filesystem)
    seen = Counter()
    for rank in range(2):
        r = reader(url, rank=rank, world_size=2, storage=st, chunk_size=4, drop_last=False)
        seen.update(k for b in r.one_epoch() for k in b["key"])
    assert sorted(seen) == all_keys and set(seen.values()) == {1}
    assert ranges and all(start is not None for _, start, _ in ranges)  # no whole-object reads: chunks are ranges


def test_shards_without_offsets_read_the_same(tmp_path):
    url, _ = build(tmp_path / "a", [13, 9, 11])
    with_offsets = [b["key"] for b in reader(url, chunk_size=4).one_epoch()]
    url2, _ = build(tmp_path / "b", [13, 9, 11])
    for m in (tmp_path / "b/train").glob("*.done.json"):  # as written before markers had offsets
        marker = json.loads(m.read_text())
        del marker["offsets"]
        m.write_text(json.dumps(marker))
    assert [b["key"] for b in reader(url2, chunk_size=4).one_epoch()] == with_offsets


def test_pin_memory_flag(tmp_path):
    url, _ = build(tmp_path, [8])
    data = DataConfig(url=url, batch_size=4, resolution=8, num_workers=0)
    r = ShardReader.from_config(data, rank=0, world_size=1, seed=0, pin_memory=True)
    b = next(iter(r))
    assert r.pin_memory == torch.cuda.is_available() and b["image"].is_pinned() == torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_are_pinned_on_gpu(tmp_path, num_workers):
    url, _ = build(tmp_path, [8, 8])
    r = reader(url, num_workers=num_workers, pin_memory=True)
    b = next(iter(r))
    assert b["image"].is_pinned() and b["label"].is_pinned()


def test_truncated_shard_on_s3_is_skipped(s3_shards):
    url, all_keys, st = s3_shards
    fs, root = filesystem(url, st)
    tar = root + "/train-000002.tar"  # the last 11 samples
    data = fs.cat_file(tar)
    fs.pipe_file(tar, data[: len(data) // 3])
    r = reader(url, storage=st, chunk_size=4, drop_last=False)
    keys = [k for b in r.one_epoch() for k in b["key"]]
    lost = set(all_keys[22:]) - set(keys)
    assert len(keys) == len(set(keys)) == 33 - len(lost) and len(lost) >= 6 and r.skipped == len(lost)
    assert set(keys) >= set(all_keys[:22])
