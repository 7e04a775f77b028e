"""The embedded default dataset: real photos shipped inside scikit-image, no network needed.

Random crops (varying scale, aspect and position) of each bundled colour photo, one class per
photo, written as a normal shard set (index.json + tars) so the reader cannot tell it from
ImageNet. Built on first use; deterministic, so concurrent builders write identical files.
"""
from __future__ import annotations

import io
import logging
import math

import numpy as np
from PIL import Image

from system.config.sections import DataConfig, StorageConfig
from system.data.shards import INDEX, plan_shards, write_index, write_shard
from system.data.storage import exists, join

log = logging.getLogger(__name__)

# skimage.data loaders whose photos ship inside the package (no download), all colour.
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
)


def load_photos() -> dict[str, np.ndarray]:
    """{name: uint8 (H, W, 3)} of the bundled colour photos."""
    import skimage.data as data  # local import: only needed when building

    out = {}
    for name in PHOTOS:
        img = getattr(data, name)()
        if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
            img = img[0]
        out[name] = np.ascontiguousarray(img[..., :3])
    return out


def random_crops(photo: np.ndarray, n: int, resolution: int, rng: np.random.Generator) -> list[bytes]:
    """`n` JPEG crops: 25-100% of the short side, aspect 3:4..4:3, short side ~R..1.5R."""
    h, w = photo.shape[:2]
    img = Image.fromarray(photo)
    out = []
    for _ in range(n):
        side = rng.uniform(0.25, 1.0) * min(h, w)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        ch, cw = min(h, round(side * math.sqrt(aspect))), min(w, round(side / math.sqrt(aspect)))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        short = int(resolution * rng.uniform(1.0, 1.5))
        scale = short / min(cw, ch)
        size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
        crop = img.resize(size, Image.BICUBIC, box=(left, top, left + cw, top + ch), reducing_gap=2.0)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def ensure_embedded_dataset(
    url: str,
    storage: StorageConfig | None = None,
    *,
    split: str = "train",
    per_class: int | None = None,
    resolution: int = 256,
    num_shards: int | None = None,
    seed: int = 0,
) -> str:
    """Build the embedded shard set for `split` at `url` (the folder that will hold index.json)
    unless its index exists; returns `url`. Defaults: train 64 crops per class in 4 shards,
    val 8 per class in 2 shards, 8 classes."""
    url = url.rstrip("/")
    if exists(join(url, INDEX), storage):
        return url
    per_class = per_class or (64 if split == "train" else 8)
    num_shards = num_shards or (4 if split == "train" else 2)
    photos = load_photos()
    classes = {name: i for i, name in enumerate(PHOTOS)}
    items = []
    for name, photo in photos.items():
        rng = np.random.default_rng([seed, classes[name], sum(split.encode())])
        for j, data in enumerate(random_crops(photo, per_class, resolution, rng)):
            items.append((data, f"{name}_{split}{j:04d}", classes[name]))
    log.info("building the embedded dataset (%d %s images) at %s", len(items), split, url)
    plans = plan_shards(items, split, math.ceil(len(items) / num_shards), seed=seed, folder="")
    for p in plans:
        write_shard(p, url, storage)
    write_index(plans, url, classes, storage)
    return url


def ensure_embedded_data(data: DataConfig) -> None:
    """With `data.embedded`: build the embedded train (and val) shard sets at `data.url` /
    `data.val_url` unless they exist (jobs call this before their config checks read the index)."""
    if data.embedded:
        ensure_embedded_shards(data.url, data.val_url, data.storage, keys=("data.url", "data.val_url"))


def ensure_embedded_shards(train: str, val: str | None, storage: StorageConfig | None = None,
                           keys: tuple[str, str] = ("images", "val_images")) -> None:
    """Build the embedded train (and val) shard sets at `train` / `val` unless they exist; a place
    that cannot hold them is a ConfigError naming `keys`."""
    from system.config import ConfigError
    from system.data.storage import StorageError

    for key, url, split in ((keys[0], train, "train"), (keys[1], val, "val")):
        if not url:
            continue
        try:
            ensure_embedded_dataset(url, storage, split=split)
        except (OSError, StorageError) as e:
            raise ConfigError(f"config key '{key}' = {url!r}: cannot build the embedded photo set there ({e}); "
                              "choose a writable folder, or embedded=false for an existing shard set") from None
