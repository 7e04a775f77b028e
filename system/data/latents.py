"""Latent shard format: SemTok's frozen-VAE latents cached beside the exact pixels they encode, so
training reads both instead of running the VAE every step (written by cluster/latent_pool.py with
system/encode/pretokenize.py `ShardLatentEncoder`; read by system/data/stream.py `ShardReader`).

Same layout, markers and index as token shards (system/data/tokens.py): one latent shard per image
shard (or per `shard_size` of its images), one sample per (source image, view), keyed
`<source key>_a<view>`. Views: augment "none" (the centre crop at `resolution`, as the image reader
makes it) or "flip" (view 0 that crop, view 1 its mirror image); ten-crop is refused (SemTok trains
on centre crops). Per sample, in tar order:

    <key>.png   the view's pixels, uint8 (R, R, 3), lossless: exactly what the VAE encoded
    <key>.cls   the class label, ASCII decimal
    <key>.aug   the view id, ASCII decimal
    <key>.lat   the latents: raw little-endian float16 (C, h, w), h = w = R / f

The index adds a `latents` section to the image index:

    {"version": 1, "split", "shards": [...], "num_samples", "classes": {...},
     "latents": {"channels": 16, "size": 32, "dtype": "float16", "resolution": 256, "augment": "flip",
                 "vae": {"fingerprint": ..., "config": {AutoencoderKL config + factors}, "source": {...}}}}

`vae.fingerprint` hashes the VAE's config and weights (`LatentVAE.fingerprint`): a training run can
check that the cached latents come from the VAE it decodes with.

Storage per view (measured on the embedded photos, flip, tar headers and shard padding included):
64 px views with 16x8x8 latents: 13,600 B a view (.png ~8 KiB + its 512 B header, .lat 2048 B +
512 B, .cls and .aug 1 KiB each); 256 px with 16x32x32 latents: 138,560 B a view (.png ~100 KiB,
.lat 32 KiB). The lossless pixels dominate: ImageNet train at 256 px, flip (2.56 M views) takes
about 350 GB (the source JPEGs: ~140 GB). PNGs are written at compress_level 1 (4 ms a 256 px
view on one core, 8% larger than level 6 at a quarter of its time).
"""
from __future__ import annotations

import io
from typing import Any, Iterable, Iterator

import numpy as np

from system.config.sections import StorageConfig
from system.data.shards import IMAGE_FIELDS, write_index
from system.data.tokens import AUGMENTATIONS, TokenShardPlan, write_view_shard

LATENT_FIELDS = ("png", "cls", "aug", "lat")
LATENT_DTYPE = np.dtype("<f2")
LATENT_AUGMENTS = ("none", "flip")  # view modes a latent cache supports (of tokens.AUGMENTATIONS)


class LatentShardPlan(TokenShardPlan):
    """One latent shard: every view of one input (image) shard. `tokenizer` holds the VAE's
    fingerprint; the shard's fingerprint also covers the input, augmentation and resolution."""

    FORMAT = "latents-v1"


LatentSample = tuple[str, np.ndarray, np.ndarray, int, int]  # (source key, pixels (R,R,3), latents (C,h,w), label, aug)


def check_latent_augment(augment: str) -> int:
    """Views per image of a latent cache's augmentation; ValueError naming the supported modes."""
    if augment not in LATENT_AUGMENTS:
        extra = " (ten-crop views are not centre crops; SemTok trains on centre crops)" if augment in AUGMENTATIONS else ""
        raise ValueError(f"augment {augment!r} is not supported for latent caches{extra}; expected one of "
                         f"{', '.join(LATENT_AUGMENTS)}")
    return AUGMENTATIONS[augment]


def encode_latent_sample(pixels: np.ndarray, latents: np.ndarray, label: int, aug: int) -> dict[str, bytes]:
    """One view's tar members {ext: bytes}: pixels uint8 (R, R, 3) as PNG, latents (C, h, w) as float16."""
    from PIL import Image

    pixels, latents = np.asarray(pixels), np.asarray(latents)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be uint8 (R, R, 3), got {pixels.dtype} {pixels.shape}")
    if latents.ndim != 3:
        raise ValueError(f"latents must be (C, h, w), got shape {latents.shape}")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return {"png": buf.getvalue(), "cls": str(int(label)).encode(), "aug": str(int(aug)).encode(),
            "lat": np.ascontiguousarray(latents, dtype=LATENT_DTYPE).tobytes()}


def latent_complete(fields: dict[str, bytes]) -> bool:
    """A latent sample has its label, latents and view pixels."""
    return "cls" in fields and "lat" in fields and any(f in fields for f in IMAGE_FIELDS)


def decode_latent_sample(fields: dict[str, bytes], channels: int, size: int,
                         resolution: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """tar members -> (pixels uint8 (R, R, 3), latents float16 (C, h, w), label, aug); ValueError
    on a malformed sample."""
    from system.data.transforms import decode_rgb

    if not latent_complete(fields):
        raise ValueError(f"latent sample lacks cls, lat or its image (fields: {sorted(fields)})")
    lat = np.frombuffer(fields["lat"], dtype=LATENT_DTYPE)
    if lat.size != channels * size * size:
        raise ValueError(f"latent sample has {lat.size} values, the index says {channels}x{size}x{size}")
    pixels = np.asarray(decode_rgb(next(fields[f] for f in IMAGE_FIELDS if f in fields)))
    if pixels.shape != (resolution, resolution, 3):
        raise ValueError(f"latent sample's view is {pixels.shape[1]}x{pixels.shape[0]} px, the index says {resolution}")
    return pixels, lat.reshape(channels, size, size), int(fields["cls"]), int(fields.get("aug", b"0"))


def latent_section(channels: int, size: int, resolution: int, augment: str, vae: dict[str, Any]) -> dict[str, Any]:
    """The index's `latents` section (`vae`: {"fingerprint", "config", "source"})."""
    check_latent_augment(augment)
    return {"channels": int(channels), "size": int(size), "dtype": "float16", "resolution": int(resolution),
            "augment": augment, "vae": dict(vae)}


def latent_meta(index: dict[str, Any], url: str = "") -> dict[str, Any]:
    """The `latents` section of a latent-shard index; ValueError (naming `url`) for any other index."""
    meta = index.get("latents")
    if not isinstance(meta, dict) or not {"channels", "size", "dtype", "resolution"} <= set(meta):
        raise ValueError(f"{url or 'index'} is not a latent-shard index (no latents section with channels, size, dtype, "
                         "resolution): write one with cluster/latent_pool.py")
    if meta["dtype"] != "float16":
        raise ValueError(f"{url or 'index'}: latents dtype {meta['dtype']!r} is not supported (expected float16)")
    return meta


def write_latent_shard(plan: LatentShardPlan, out_url: str, samples: Iterable[LatentSample],
                       storage: StorageConfig | None = None, stats: dict | None = None) -> dict:
    """Write one latent shard (tar, then its marker) from (source key, pixels, latents, label, aug)
    samples; returns the marker (with `stats`). ValueError on a repeated (key, aug)."""
    stats = stats if stats is not None else {}
    stats.update(views=check_latent_augment(plan.augment), latent_shape=[])

    def members() -> Iterator[tuple[str, int, dict[str, bytes]]]:
        for src_key, pixels, latents, label, aug in samples:
            stats["latent_shape"] = list(np.shape(latents))
            yield src_key, aug, encode_latent_sample(pixels, latents, label, aug)

    return write_view_shard(plan, out_url, members(), storage, stats)


def write_latent_index(plans: list[LatentShardPlan], out_url: str, classes: dict[str, int], meta: dict[str, Any],
                       storage: StorageConfig | None = None) -> dict:
    """`index.json` (written last) listing the complete latent shards, with the `latents` section."""
    return write_index(plans, out_url, classes, storage, extra={"latents": meta})
