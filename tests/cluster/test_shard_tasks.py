import io
import os

import numpy as np
import pytest
import ray
from PIL import Image

from cluster.runtime import init_ray
from cluster.shards import make_shards, plan_all, run_write_tasks
from system.config import ClusterConfig, MakeShardsConfig
from system.data import read_index

pytestmark = pytest.mark.slow


def fake_imagenet(root, wnids=("n001", "n002", "n003", "n004"), train=8, val=2):
    for split, n in (("train", train), ("val", val)):
        for c, wnid in enumerate(wnids):
            (root / split / wnid).mkdir(parents=True)
            for j in range(n):
                arr = np.random.default_rng([c, j, len(split)]).integers(0, 256, (30 + j, 40, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="JPEG")
                (root / split / wnid / f"{wnid}_{j}.JPEG").write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def local_ray():
    assert not ray.is_initialized()
    init_ray(ClusterConfig(local_num_cpus=2))  # a local Ray whose workers import this checkout
    yield
    ray.shutdown()


def test_make_shards_with_ray_tasks_and_rerun(local_ray, tmp_path):
    fake_imagenet(tmp_path / "src")
    cfg = MakeShardsConfig(src=str(tmp_path / "src"), out=str(tmp_path / "out"), shard_size=10, parallelism=2)
    idx = make_shards(cfg, progress=False)
    assert [s["count"] for s in idx["train"]["shards"]] == [10, 10, 10, 2]
    assert idx["val"]["num_samples"] == 8 and idx["val"]["classes"] == idx["train"]["classes"]
    assert read_index(str(tmp_path / "out/train")) == idx["train"]
    tars = sorted((tmp_path / "out/train").glob("*.tar"))
    stamps = {p: p.stat().st_mtime_ns for p in tars}
    os.remove(tmp_path / "out/train/train-000002.tar.done.json")  # this shard's task "died"
    idx2 = make_shards(cfg, progress=False)
    assert idx2 == idx
    changed = [p.name for p in tars if p.stat().st_mtime_ns != stamps[p]]
    assert changed == ["train-000002.tar"]  # only the incomplete shard was written again


def test_failed_task_is_reported_and_others_kept(local_ray, tmp_path):
    fake_imagenet(tmp_path / "src", wnids=("n001", "n002"), train=5, val=1)
    cfg = MakeShardsConfig(src=str(tmp_path / "src"), out=str(tmp_path / "out"), splits=["train"], shard_size=5)
    _, plans = plan_all(cfg)
    src, _, _ = plans["train"][1].items[0]
    os.remove(src)  # the source vanishes after planning
    failures = run_write_tasks(plans["train"], cfg, total=2, progress=False)
    assert len(failures) == 1 and failures[0].startswith("train/train-000001.tar") and src in failures[0]
    assert (tmp_path / "out/train/train-000000.tar.done.json").exists()
    assert not (tmp_path / "out/train/train-000001.tar").exists()  # nothing half-written is visible
