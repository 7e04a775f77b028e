"""Our shards are plain WebDataset: every shard kind we write (image shards of make_shards, token
shards of pre-tokenization, latent shards of the latent cache; all through shards.write_tar, i.e.
webdataset's TarWriter) reads back with webdataset's own reader, `wds.WebDataset`, with the same
keys and bytes our resumable reader sees."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from system.data.latents import LatentShardPlan, write_latent_shard
from system.data.shards import iter_tar_samples, plan_shards, read_marker, write_shard
from system.data.tokens import write_token_set


def wds_samples(tar: Path) -> list[dict]:
    return list(wds.WebDataset(str(tar), shardshuffle=False, empty_check=False))


def ours(tar: Path) -> list[tuple[str, dict[str, bytes]]]:
    with open(tar, "rb") as f:
        return list(iter_tar_samples(f, str(tar)))


def same(theirs: list[dict], mine: list[tuple[str, dict[str, bytes]]]) -> None:
    assert [s["__key__"] for s in theirs] == [k for k, _ in mine]
    for s, (_, fields) in zip(theirs, mine):
        assert {k: v for k, v in s.items() if not k.startswith("__")} == fields


def jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_image_shards_read_with_webdataset(tmp_path):
    items = [(jpeg((40 * i, 10, 200 - 30 * i)), f"n0000{i % 2}_img{i}", i % 2) for i in range(5)]
    (plan,) = plan_shards(items, "train", shard_size=8)
    marker = write_shard(plan, str(tmp_path))
    tar = tmp_path / "train" / plan.name
    theirs = wds_samples(tar)
    assert len(theirs) == marker["count"] == 5
    by_key = {key: (data, label) for data, key, label in items}
    for s in theirs:
        data, label = by_key[s["__key__"]]
        assert s["jpg"] == data and int(s["cls"]) == label
        assert Image.open(io.BytesIO(s["jpg"])).size == (8, 6)
    same(theirs, ours(tar))
    # the marker's offsets delimit each sample: a ranged read of sample 2 alone is a valid tar
    offsets = read_marker(str(tmp_path / "train"), plan.name)["offsets"]
    one = tmp_path / "one.tar"
    one.write_bytes(tar.read_bytes()[offsets[2]:offsets[3]] + b"\0" * 1024)
    assert [s["__key__"] for s in wds_samples(one)] == [theirs[2]["__key__"]]


def test_shards_are_reproducible(tmp_path):
    items = [(jpeg((i, i, i)), f"k{i}", 0) for i in range(3)]
    a = write_shard(plan_shards(items, "train", 8)[0], str(tmp_path / "a"))
    b = write_shard(plan_shards(items, "train", 8)[0], str(tmp_path / "b"))
    assert a["sha256"] == b["sha256"]


def test_token_shards_read_with_webdataset(tmp_path):
    codes = np.arange(6 * 4, dtype=np.int64).reshape(6, 4) % 1000
    labels = np.array([0, 0, 1, 1, 2, 2])
    index = write_token_set(str(tmp_path), codes, labels, vocab_size=1000, num_shards=2, augment="flip")
    rows = []
    for shard in index["shards"]:
        tar = tmp_path / shard["name"]
        theirs = wds_samples(tar)
        same(theirs, ours(tar))
        rows += [(np.frombuffer(s["tok"], dtype=np.uint16), int(s["cls"]), int(s["aug"])) for s in theirs]
    assert len(rows) == 6
    for i, (tok, label, aug) in enumerate(rows):
        assert np.array_equal(tok, codes[i]) and label == labels[i] and aug == i % 2


def test_latent_shards_read_with_webdataset(tmp_path):
    rng = np.random.default_rng(0)
    plan = LatentShardPlan("train", "train-000000.tar", count=2, augment="none", folder="")
    samples = [(f"s{i}", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), rng.standard_normal((4, 2, 2)).astype(np.float16),
                i, 0) for i in range(2)]
    marker = write_latent_shard(plan, str(tmp_path), samples)
    tar = tmp_path / plan.name
    theirs = wds_samples(tar)
    assert len(theirs) == marker["count"] == 2
    same(theirs, ours(tar))
    assert all(int(s["cls"]) == i for i, s in enumerate(theirs))
