"""WebDataset shard format: planning, writing, completion markers and the index.

Layout under `<out>/<split>/`: `<split>-000000.tar` ... each holding `<key>.jpg` + `<key>.cls`
(key unique in the set, `<wnid>_<stem>`), a marker `<name>.done.json` written after its tar is
complete (count, sha256, the byte offset of every sample for ranged reads), and `index.json` written last, listing only shards whose marker exists:
{"version": 1, "split", "shards": [{"name", "count"}], "num_samples", "classes": {wnid: idx}}.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import IO, Callable, Iterable, Iterator, Union

import numpy as np
from PIL import Image

from system.config.sections import StorageConfig
from system.data.imagenet_labels import read_val_labels
from system.data.storage import (
    filesystem,
    join,
    open_atomic_write,
    read_json,
    storage_error,
    write_bytes_atomic,
)

log = logging.getLogger(__name__)

INDEX = "index.json"
MARKER_SUFFIX = ".done.json"
IMAGE_EXTS = {".jpeg": "jpg", ".jpg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp"}
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp")

Source = Union[str, bytes]  # a file URL/path, or the encoded image itself


@dataclass
class ShardPlan:
    """One shard to write: its items are (source, key, label) in tar order."""

    split: str
    name: str
    items: list[tuple[Source, str, int]] = field(default_factory=list)
    ext: list[str] = field(default_factory=list)  # member extension per item ("jpg", "png")
    max_side: int = 0
    src_storage: StorageConfig | None = None
    folder: str | None = None  # under the output URL; None: the split name

    def split_url(self, out_url: str) -> str:
        return join(out_url, self.split if self.folder is None else self.folder)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for (_, key, label), ext in zip(self.items, self.ext):
            h.update(f"{key}.{ext}:{label};".encode())
        h.update(f"max_side={self.max_side}".encode())
        return h.hexdigest()[:16]


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def safe_key(*parts: str) -> str:
    """WebDataset keys may not contain dots (the extension starts at the first one)."""
    return "_".join(re.sub(r"[^A-Za-z0-9_-]", "_", p) for p in parts)


def _image_files(fs, folder: str) -> list[str]:
    return sorted(p for p in fs.find(folder) if os.path.splitext(p)[1].lower() in IMAGE_EXTS)


def find_classes(src: str, storage: StorageConfig | None = None) -> dict[str, int]:
    """{wnid: index} from the sorted class folders of `src/train` (else `src/val`)."""
    fs, root = filesystem(src, storage)
    for split in ("train", "val"):
        folder = join(root, split)
        if fs.isdir(folder):
            names = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(folder, detail=False) if fs.isdir(p))
            if names:
                return {n: i for i, n in enumerate(names)}
    raise FileNotFoundError(f"no class folders in {join(src, 'train')} (expected train/<wnid>/*.JPEG)")


def list_split(
    src: str,
    split: str,
    classes: dict[str, int],
    val_labels: str | None = None,
    storage: StorageConfig | None = None,
    val_synsets: str | None = None,
) -> list[tuple[str, str, int]]:
    """Sorted (url, key, label) of a split: `<split>/<wnid>/*` folders, or a flat folder + labels
    file (ImageNet's own: system/data/imagenet_labels.py)."""
    fs, root = filesystem(src, storage)
    folder = join(root, split)
    if not fs.isdir(folder):
        raise FileNotFoundError(f"split folder not found: {join(src, split)} (set `splits` to the splits you have)")
    proto = src.split("://", 1)[0] + "://" if "://" in src else ""
    items = []
    subdirs = [p for p in fs.ls(folder, detail=False) if fs.isdir(p)]
    if subdirs:
        for d in sorted(subdirs):
            wnid = os.path.basename(d.rstrip("/"))
            if wnid not in classes:
                raise ValueError(f"class folder {wnid!r} in {join(src, split)} is not a train class")
            for p in _image_files(fs, d):
                items.append((proto + p, safe_key(wnid, os.path.splitext(os.path.basename(p))[0]), classes[wnid]))
    else:
        if not val_labels:
            raise ValueError(f"{join(src, split)} has no class folders; set val_labels=<file> for a flat folder "
                             "(LOC_val_solution.csv, ILSVRC2012_validation_ground_truth.txt + val_synsets=meta.mat, "
                             "or '<filename> <wnid>' lines)")
        labels = read_val_labels(val_labels, classes, storage, val_synsets)
        inv = {v: k for k, v in classes.items()}
        for p in _image_files(fs, folder):
            name = os.path.basename(p)
            stem = os.path.splitext(name)[0]
            if stem not in labels:
                raise ValueError(f"{name} in {join(src, split)} has no entry in {val_labels}")
            items.append((proto + p, safe_key(inv[labels[stem]], stem), labels[stem]))
    if not items:
        raise FileNotFoundError(f"no images in {join(src, split)} (expected {', '.join(sorted(IMAGE_EXTS))} files)")
    keys = [k for _, k, _ in items]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate sample keys in {join(src, split)} (file stems must be unique per class)")
    return items


def plan_shards(
    items: list[tuple[Source, str, int]],
    split: str,
    shard_size: int,
    seed: int = 0,
    max_side: int = 0,
    src_storage: StorageConfig | None = None,
    folder: str | None = None,
) -> list[ShardPlan]:
    """Deterministic shards: a seeded shuffle of the sorted items (so each shard mixes classes)."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be > 0, got {shard_size}")
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(items))
    plans = []
    for i, start in enumerate(range(0, len(items), shard_size)):
        chunk = [items[j] for j in order[start : start + shard_size]]
        exts = [IMAGE_EXTS.get(os.path.splitext(s)[1].lower(), "jpg") if isinstance(s, str) else "jpg" for s, _, _ in chunk]
        plans.append(ShardPlan(split, shard_name(split, i), chunk, exts, max_side, src_storage, folder))
    return plans


def _shrink(data: bytes, max_side: int, key: str) -> tuple[bytes, bool]:
    """Re-encode as JPEG when the shorter side exceeds `max_side` (aspect kept). Undecodable
    bytes are kept as they are (the reader skips and counts them)."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # noqa: BLE001
        log.warning("cannot decode source image %r (%s); stored unchanged", key, e)
        return data, False
    if min(img.size) <= max_side:
        return data, False
    scale = max_side / min(img.size)
    img = img.convert("RGB").resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue(), True


class _HashingWriter:
    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


def read_marker(split_url: str, name: str, storage: StorageConfig | None = None) -> dict | None:
    try:
        return read_json(join(split_url, name + MARKER_SUFFIX), storage)
    except FileNotFoundError:
        return None


def done_marker(split_url: str, name: str, fingerprint: str, storage: StorageConfig | None = None) -> dict | None:
    """The marker of shard `name` when it exists and was written for `fingerprint`, else None."""
    marker = read_marker(split_url, name, storage)
    return marker if marker is not None and marker.get("fingerprint") == fingerprint else None


def write_tar(
    split_url: str,
    name: str,
    fingerprint: str,
    samples: Iterable[tuple[str, dict[str, bytes]]],
    storage: StorageConfig | None = None,
    stats: dict | None = None,
) -> dict:
    """Write the samples (key, {ext: bytes}) as tar `<split_url>/<name>` (atomically, with
    webdataset's TarWriter: `webdataset.WebDataset` reads the shards as they are), then its
    marker {name, count, bytes, sha256, fingerprint, **stats, offsets}; returns the marker.
    `offsets`: the byte offset of each sample's first member, then the end of the last sample
    (count + 1 numbers), so a reader can fetch a range of samples with one ranged read. `stats`
    may be filled while `samples` is consumed."""
    from webdataset import TarWriter  # imported here: readers of shards do not need it

    tar_url = join(split_url, name)
    count, offsets = 0, []
    try:
        with open_atomic_write(tar_url, storage) as raw:
            out = _HashingWriter(raw)
            # webdataset's writer (USTAR); mtime 0 and no owner names: the same samples give the same
            # bytes (the marker's sha256) on every run. One member per write() keeps the fields' order
            # (the image before its label; TarWriter sorts a sample's fields by name): the same key
            # on consecutive members is one sample to every WebDataset reader.
            with TarWriter(out, encoder=False, mtime=0, mode=0o444, user="", group="") as tar:
                for key, fields in samples:
                    offsets.append(tar.tarstream.offset)
                    for ext, data in fields.items():
                        tar.write({"__key__": key, ext: data})
                    count += 1
                offsets.append(tar.tarstream.offset)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:  # noqa: BLE001
        raise storage_error(tar_url, storage, e) from e
    marker = {"name": name, "count": count, "bytes": out.size, "sha256": out.sha.hexdigest(), "fingerprint": fingerprint,
              **(stats or {}), "offsets": offsets}
    write_bytes_atomic(join(split_url, name + MARKER_SUFFIX), json.dumps(marker).encode(), storage)
    return marker


def write_shard(plan: ShardPlan, out_url: str, storage: StorageConfig | None = None) -> dict:
    """Write one shard tar to `<out_url>/<split>/<name>`, then its marker; returns the marker.
    A shard whose marker exists with the same plan fingerprint is skipped."""
    split_url = plan.split_url(out_url)
    fp = plan.fingerprint()
    marker = done_marker(split_url, plan.name, fp, storage)
    if marker is not None:
        return marker
    stats = {"reencoded": 0}

    def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
        for (src, key, label), ext in zip(plan.items, plan.ext):
            if isinstance(src, str):
                fs, p = filesystem(src, plan.src_storage)
                data = fs.cat_file(p)
            else:
                data = src
            if plan.max_side > 0:
                data, changed = _shrink(data, plan.max_side, key)
                if changed:
                    ext, stats["reencoded"] = "jpg", stats["reencoded"] + 1
            yield key, {ext: data, "cls": str(label).encode()}

    return write_tar(split_url, plan.name, fp, samples(), storage, stats)


def pending_shards(plans: list[ShardPlan], out_url: str, storage: StorageConfig | None = None) -> list[ShardPlan]:
    """Plans whose shard is not complete yet (no marker, or a marker from a different plan)."""
    done = complete_markers(plans, out_url, storage)
    return [p for p in plans if p.name not in done]


def complete_markers(plans: list[ShardPlan], out_url: str, storage: StorageConfig | None = None) -> dict[str, dict]:
    """{shard name: marker} for planned shards whose marker exists and matches the plan."""
    if not plans:
        return {}
    split_url = plans[0].split_url(out_url)
    fs, root = filesystem(split_url, storage)
    try:
        names = set(os.path.basename(p) for p in fs.ls(root, detail=False)) if fs.exists(root) else set()
        paths = [join(root, p.name + MARKER_SUFFIX) for p in plans if p.name + MARKER_SUFFIX in names]
        blobs = fs.cat(paths, on_error="omit") if paths else {}
    except Exception as e:  # noqa: BLE001
        raise storage_error(split_url, storage, e) from e
    by_name = {os.path.basename(k)[: -len(MARKER_SUFFIX)]: json.loads(v) for k, v in blobs.items()}
    return {p.name: by_name[p.name] for p in plans if by_name.get(p.name, {}).get("fingerprint") == p.fingerprint()}


def write_index(
    plans: list[ShardPlan],
    out_url: str,
    classes: dict[str, int],
    storage: StorageConfig | None = None,
    extra: dict | None = None,
) -> dict:
    """Write `<out_url>/<split>/index.json` listing only the planned shards that are complete
    (`extra`: more top-level sections, e.g. a token set's `tokens`)."""
    if not plans:
        raise ValueError("write_index needs at least one planned shard")
    split = plans[0].split
    done = complete_markers(plans, out_url, storage)
    shards = [{"name": p.name, "count": done[p.name]["count"]} for p in plans if p.name in done]
    index = {
        "version": 1,
        "split": split,
        "shards": shards,
        "num_samples": sum(s["count"] for s in shards),
        "classes": dict(classes),
        **(extra or {}),
    }
    write_bytes_atomic(join(plans[0].split_url(out_url), INDEX), json.dumps(index, indent=1).encode(), storage)
    return index


def read_index(split_url: str, storage: StorageConfig | None = None) -> dict:
    """The index of a shard folder; FileNotFoundError / StorageError name the URL."""
    url = join(split_url, INDEX)
    try:
        index = read_json(url, storage)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no shard index at {url}: expected a folder written by jobs/make_shards.py (<out>/<split>/)"
        ) from None
    if not isinstance(index, dict) or index.get("version") != 1 or "shards" not in index:
        raise ValueError(f"{url} is not a version-1 shard index")
    return index


def image_complete(fields: dict[str, bytes]) -> bool:
    """An image sample has its label and one image member."""
    return "cls" in fields and any(f in fields for f in IMAGE_FIELDS)


def iter_tar_samples(
    fileobj: IO[bytes], url: str = "", complete: Callable[[dict[str, bytes]], bool] = image_complete
) -> Iterator[tuple[str, dict[str, bytes] | None]]:
    """(key, {ext: bytes}) for consecutive members sharing a key. A truncated or corrupt tar ends
    the iteration with one `(key, None)` (the sample lost where it broke), logged with `url`; the
    sample read just before the break is kept when `complete(fields)` says it is whole."""
    key, fields = None, {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                k, _, ext = os.path.basename(m.name).partition(".")
                data = tar.extractfile(m).read()
                if len(data) != m.size:
                    raise tarfile.ReadError(f"member {m.name} is truncated")
                if k != key and key is not None:
                    yield key, fields
                    fields = {}
                key = k
                fields[ext.lower()] = data
    except (tarfile.TarError, EOFError) as e:  # storage errors (OSError) propagate
        log.warning("truncated or corrupt tar %s after key %r: %s; continuing with the next shard", url, key, e)
        if key is not None and complete(fields):
            yield key, fields
            key = None
        yield key or "<unknown>", None
        return
    if key is not None:
        yield key, fields


def check_shard_set(url: str, key: str, storage: StorageConfig | None = None) -> dict:
    """The index at `url`, or a ConfigError naming config key `key` and what would be right."""
    from system.config import ConfigError
    from system.data.storage import StorageError

    try:
        return read_index(url, storage)
    except (FileNotFoundError, StorageError, ValueError, OSError) as e:
        raise ConfigError(f"config key '{key}' = {url!r}: {e}. Point it at a shard set written by jobs/make_shards.py "
                          "(a folder or s3://bucket/prefix holding index.json), or use the embedded photos "
                          "(--config configs/experiments/eostok_tiny.yaml)") from None
