import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from system.config import StorageConfig
from system.data import ShardReader, filesystem, pending_shards, plan_shards, read_index, write_index, write_shard
from system.data.shards import find_classes, iter_tar_samples, list_split


def jpeg(seed: int, size=(40, 32)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def items(n=20, classes=4):
    return [(jpeg(i), f"c{i % classes}_{i:03d}", i % classes) for i in range(n)]


CLASSES = {f"c{i}": i for i in range(4)}


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "shards"), StorageConfig()
    endpoint = request.getfixturevalue("s3_server")
    st = StorageConfig(endpoint_url=endpoint)
    fs, _ = filesystem("s3://x", st)
    bucket = f"shards-{abs(hash(str(tmp_path))) % 10**8}"
    fs.mkdir(bucket)
    return f"s3://{bucket}/imagenet", st


def test_round_trip(out):
    url, st = out
    its = items(20)
    plans = plan_shards(its, "train", shard_size=8, seed=1)
    assert [p.name for p in plans] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    markers = [write_shard(p, url, st) for p in plans]
    assert [m["count"] for m in markers] == [8, 8, 4]
    index = write_index(plans, url, CLASSES, st)
    assert read_index(f"{url}/train", st) == index
    assert index["num_samples"] == 20 and index["classes"] == CLASSES and index["split"] == "train"
    batches = []
    for rank in range(2):  # 2 ranks x 2 forked dataloader workers: each reads its share of chunks
        r = ShardReader(f"{url}/train", rank=rank, world_size=2, batch_size=5, resolution=16, storage=st, drop_last=False, num_workers=2)
        for b in r.one_epoch():
            batches.append(b)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(k for _, k, _ in its)
    labels = {k: int(lab) for b in batches for k, lab in zip(b["key"], b["label"])}
    assert all(labels[k] == int(k[1]) for k in keys)
    assert batches[0]["image"].shape[1:] == (3, 16, 16)
    fs, root = filesystem(url + "/train", st)
    with fs.open(f"{root}/train-000000.tar", "rb") as f:  # a plain WebDataset tar
        names = [m.name for m in tarfile.open(fileobj=f, mode="r|")]
    assert names[:2] == [names[0].split(".")[0] + ".jpg", names[0].split(".")[0] + ".cls"]


def test_plan_is_deterministic_and_mixes_classes():
    its = [(f"/x/c{i // 10}/{i}.JPEG", f"c{i // 10}_{i}", i // 10) for i in range(40)]
    a = plan_shards(its, "train", shard_size=10, seed=0)
    b = plan_shards(its, "train", shard_size=10, seed=0)
    assert [p.items for p in a] == [p.items for p in b]
    assert all(len({lab for _, _, lab in p.items}) > 1 for p in a)  # sorted input, mixed shards
    assert [p.items for p in plan_shards(its, "train", 10, seed=1)] != [p.items for p in a]


def test_rerun_skips_complete_and_half_written_is_not_listed(tmp_path):
    url = str(tmp_path / "out")
    plans = plan_shards(items(12), "train", shard_size=4)
    write_shard(plans[0], url)
    write_shard(plans[1], url)
    # shard 2 was half-written when its task died: a tar without a marker
    (tmp_path / "out/train/train-000002.tar").write_bytes(b"\0" * 700)
    assert [p.name for p in pending_shards(plans, url)] == ["train-000002.tar"]
    index = write_index(plans, url, CLASSES)
    assert [s["name"] for s in index["shards"]] == ["train-000000.tar", "train-000001.tar"]
    assert index["num_samples"] == 8
    # a re-run does not rewrite a complete shard
    tar0 = tmp_path / "out/train/train-000000.tar"
    tar0.write_bytes(b"sentinel")
    write_shard(plans[0], url)
    assert tar0.read_bytes() == b"sentinel"
    # ... but a marker from a different plan (other shard_size) does not count as complete
    other = plan_shards(items(12), "train", shard_size=6)
    assert [p.name for p in pending_shards(other, url)] == ["train-000000.tar", "train-000001.tar"]


def test_list_split_folders_and_val_labels(tmp_path):
    for wnid in ("n01", "n02"):
        for j in range(3):
            (tmp_path / "train" / wnid).mkdir(parents=True, exist_ok=True)
            (tmp_path / "train" / wnid / f"img.{j}.JPEG").write_bytes(jpeg(j))
    (tmp_path / "val").mkdir()
    for j in range(4):
        (tmp_path / "val" / f"ILSVRC_val_{j}.JPEG").write_bytes(jpeg(j))
    (tmp_path / "labels.txt").write_text("ILSVRC_val_0.JPEG n02\nILSVRC_val_1.JPEG 0\nILSVRC_val_2.JPEG n01\nILSVRC_val_3.JPEG 1\n")
    classes = find_classes(str(tmp_path))
    assert classes == {"n01": 0, "n02": 1}
    train = list_split(str(tmp_path), "train", classes)
    assert len(train) == 6 and train[0][1:] == ("n01_img_0", 0)  # dots leave the key
    val = list_split(str(tmp_path), "val", classes, val_labels=str(tmp_path / "labels.txt"))
    assert [(k, lab) for _, k, lab in val] == [("n02_ILSVRC_val_0", 1), ("n01_ILSVRC_val_1", 0), ("n01_ILSVRC_val_2", 0), ("n02_ILSVRC_val_3", 1)]
    with pytest.raises(ValueError, match="val_labels"):
        list_split(str(tmp_path), "val", classes)


def test_iter_tar_samples_reports_truncation(tmp_path):
    plans = plan_shards(items(6), "train", shard_size=6)
    write_shard(plans[0], str(tmp_path))
    data = (tmp_path / "train/train-000000.tar").read_bytes()
    whole = list(iter_tar_samples(io.BytesIO(data)))
    assert len(whole) == 6 and all(f is not None for _, f in whole)
    cut = list(iter_tar_samples(io.BytesIO(data[: len(data) // 2]), "u"))
    assert cut[-1][1] is None and 1 <= len(cut) - 1 < 6
    assert [k for k, _ in cut[:-1]] == [k for k, _ in whole[: len(cut) - 1]]
