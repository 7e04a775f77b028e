import os

from system.config import DataConfig
from system.data import ShardReader, ensure_embedded_dataset, read_index
from system.data.embedded import PHOTOS


def test_embedded_dataset_builds_once_and_reads(tmp_path):
    url = str(tmp_path / "embedded" / "train")
    data = DataConfig(url=url, val_url=str(tmp_path / "embedded" / "val"), embedded=True, batch_size=32, resolution=32, num_workers=0)
    r = ShardReader.from_config(data, rank=0, world_size=1, seed=0)  # builds on first use
    index = read_index(url)
    assert index["classes"] == {name: i for i, name in enumerate(PHOTOS)} and len(PHOTOS) == 8
    assert len(index["shards"]) >= 2 and index["num_samples"] == 8 * 64
    stamp = os.stat(os.path.join(url, "index.json")).st_mtime_ns
    ensure_embedded_dataset(url)  # present: not rebuilt
    assert os.stat(os.path.join(url, "index.json")).st_mtime_ns == stamp

    rv = ShardReader.from_config(data, rank=0, world_size=1, seed=0, val=True)
    vindex = read_index(data.val_url)
    assert vindex["num_samples"] == 8 * 8 and len(vindex["shards"]) == 2 and rv.num_samples == 64
    assert all(k.split("_val")[0] in index["classes"] for k in next(iter(rv))["key"])  # val crops
    b = next(iter(r))
    assert b["image"].shape == (32, 3, 32, 32) and r.skipped == 0
    assert len(set(b["label"].tolist())) > 2  # shards mix the photos
    assert b["image"].std() > 0.1  # real photo content, not blank


def test_embedded_is_deterministic(tmp_path):
    a = ensure_embedded_dataset(str(tmp_path / "a"), split="val", per_class=2, num_shards=2)
    b = ensure_embedded_dataset(str(tmp_path / "b"), split="val", per_class=2, num_shards=2)
    for name in ("val-000000.tar", "val-000001.tar", "index.json"):
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read()
