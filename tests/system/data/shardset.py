"""Small image shard sets for the reader tests: exact per-shard sample counts, optional corrupt samples."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from system.config import StorageConfig
from system.data import plan_shards, write_index, write_shard


def jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def build(root, counts, corrupt=(), storage: StorageConfig | None = None):
    """Shard set at `<root>/train` with the given per-shard sample counts (keys s000, s001, ... in
    shard order); keys in `corrupt` get garbage bytes. Returns (url, sorted keys)."""
    n = sum(counts)
    its = [(b"garbage" if f"s{i:03d}" in corrupt else jpeg(i), f"s{i:03d}", i % 5) for i in range(n)]
    plans, start = [], 0
    for j, c in enumerate(counts):  # exact counts per shard (plan_shards makes equal ones)
        p = plan_shards(its[start : start + c], "train", shard_size=c, seed=j)[0]
        p.name = f"train-{j:06d}.tar"
        plans.append(p)
        start += c
    root = str(root).rstrip("/")
    for p in plans:
        write_shard(p, root, storage)
    write_index(plans, root, {f"c{i}": i for i in range(5)}, storage)
    return f"{root}/train", sorted(k for _, k, _ in its)


def shard_keys(counts) -> list[list[str]]:
    """The keys of each shard of `build(root, counts)`."""
    out, start = [], 0
    for c in counts:
        out.append([f"s{i:03d}" for i in range(start, start + c)])
        start += c
    return out
