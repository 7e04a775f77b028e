"""Helpers for the pool tests (importable by Ray workers: tests/cluster is on their PYTHONPATH):
a local Ray fixture, a small image shard set, a token shard set written from arrays, and a token
batch source that logs the keys of every batch the rank loop draws."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from system.data.sources import ImageShards, TokenShards
from system.data.source import BatchSource

SEQ_LEN, VOCAB, CLASSES = 16, 64, 4


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray (4 CPUs) for a test module, with its own dashboard: Ray Train's placement-group
    cleaner asks the state API whether the run's controller lives, and without a dashboard that
    query goes to 127.0.0.1:8265, which may be another Ray on this machine; "not found" there reads
    as dead and the run's placement group (and its workers) are removed mid-run."""
    import ray

    env = {"PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests", "cluster")]), "DS_ACCELERATOR": "cpu",
           "WANDB_MODE": "offline"}
    if ray.is_initialized():  # another module's cluster lacks our env vars
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=True, dashboard_port=free_port(), runtime_env={"env_vars": env},
             log_to_driver=False)
    yield
    ray.shutdown()


def write_image_shards(url: str, n: int, side: int = 20, quality: int = 75, storage=None, num_shards: int = 2) -> str:
    """`n` random side x side JPEGs (classes a/b alternating) in `num_shards` shards + index under
    `url`, as jobs/make_shards.py writes them; returns the train split's URL."""
    import io

    from PIL import Image

    from system.data import plan_shards, write_index, write_shard

    items = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
            buf, format="JPEG", quality=quality)
        items.append((buf.getvalue(), f"img{i:03d}", i % 2))
    plans = plan_shards(items, "train", shard_size=n // num_shards)
    for p in plans:
        write_shard(p, url, storage)
    write_index(plans, url, {"a": 0, "b": 1}, storage)
    return f"{url}/train"


def garble_shard(split_url: str, k: int) -> list[int]:
    """Overwrite shard `k` (index order) of a local shard set with random bytes of the same size (its
    index entry intact: every sample of it unreadable); returns the sample ids (index order) it held."""
    with open(os.path.join(split_url, "index.json")) as f:
        shards = json.load(f)["shards"]
    path = os.path.join(split_url, shards[k]["name"])
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(np.random.default_rng(k).integers(0, 256, size, dtype=np.uint8).tobytes())
    first = sum(int(s["count"]) for s in shards[:k])
    return list(range(first, first + int(shards[k]["count"])))


def write_tokens(url: str, n: int = 32, seed: int = 0) -> str:
    """`n` learnable sequences (a class-dependent ramp plus noise) as a 2-shard token set at `url`."""
    from system.data.tokens import write_token_set

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    codes = (labels[:, None] * 7 + np.arange(SEQ_LEN)[None] + rng.integers(0, 2, (n, SEQ_LEN))) % VOCAB
    write_token_set(url, codes, labels, VOCAB, num_shards=2)
    return url


class KeyLog(BatchSource):
    """A batch source's batches, each logged as {"step", "keys", "pid", "t"} (the drawing process
    and the time) to `<folder>/keys_rank<r>.jsonl` when the loop draws it."""

    def __init__(self, inner: BatchSource, folder: str, rank: int, step):
        self.inner, self.folder, self.rank, self.step = inner, folder, rank, step

    def __iter__(self):
        os.makedirs(self.folder, exist_ok=True)
        for batch in self.inner:
            with open(os.path.join(self.folder, f"keys_rank{self.rank}.jsonl"), "a") as f:
                f.write(json.dumps({"step": self.step(), "keys": list(batch["key"]), "pid": os.getpid(),
                                    "t": time.time()}) + "\n")
            yield batch

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def summary(self) -> dict:
        return self.inner.summary()

    def close(self) -> None:
        self.inner.close()


class KeyLoggingTokens(TokenShards):
    """Picklable batch-source factory: the job's token shards, keys logged under `folder`."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, exp, ctx) -> KeyLog:
        return KeyLog(TokenShards()(exp, ctx), self.folder, ctx.rank, ctx.step)


class KeyLoggingImages(ImageShards):
    """Picklable batch-source factory: the job's image shards, keys logged under `folder`."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, exp, ctx) -> KeyLog:
        return KeyLog(ImageShards()(exp, ctx), self.folder, ctx.rank, ctx.step)


def key_log(folder, ranks=(0, 1)) -> dict[tuple[int, int], list[str]]:
    """(rank, step) -> keys of the last attempt that ran that step."""
    out = {}
    for rank in ranks:
        for line in open(os.path.join(folder, f"keys_rank{rank}.jsonl")).read().splitlines():
            row = json.loads(line)
            out[(rank, row["step"])] = row["keys"]
    return out
