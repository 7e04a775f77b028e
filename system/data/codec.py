"""How the shard readers (system/data/stream.py) decode one sample's tar members: a `SampleCodec`
per kind of shard set. `ImageCodec`: image shards (system/data/shards.py) -> center-cropped
uint8 pixels with a seeded per-sample flip; `TokenCodec`: token shards (system/data/tokens.py) ->
int64 codes; `LatentCodec`: a latent cache (system/data/latents.py) -> view pixels and latents."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from system.data.latents import decode_latent_sample, latent_complete
from system.data.shards import IMAGE_FIELDS, image_complete
from system.data.tokens import decode_token_sample
from system.data.transforms import center_crop_arr, decode_rgb, flip_decision, to_tensor

log = logging.getLogger(__name__)


class SampleCodec:
    """What a reader does with one sample's tar members: `decode` -> (value, label) (raises on a
    corrupt sample, which is then skipped and counted); `batch_fields` turns a batch's values into
    its entries {name: tensor} (by default `collate` stacks arrays into the one entry named
    `field`; a codec that fills several entries overrides `batch_fields`). Picklable (it travels to
    dataloader workers)."""

    field = "sample"  # the batch entry (and the name of a sample in warnings)

    def complete(self, fields: dict[str, bytes]) -> bool:
        raise NotImplementedError

    def decode(self, key: str, fields: dict[str, bytes], epoch: int) -> tuple[Any, int]:
        raise NotImplementedError

    def collate(self, arrays: list[np.ndarray]) -> torch.Tensor:
        raise NotImplementedError

    def batch_fields(self, values: list[Any]) -> dict[str, torch.Tensor]:
        return {self.field: self.collate(values)}

    def sample(self, raw: Optional[tuple[str, dict]], url: str, epoch: int) -> Optional[tuple[Any, int, str]]:
        """(value, label, key) of a raw sample (key, fields) of the shard at `url`; None, with a
        warning naming the key and the shard, when it is missing (raw None), incomplete or corrupt."""
        if raw is None:
            return None
        key, fields = raw
        if not self.complete(fields):
            log.warning("skipping incomplete sample %r in %s (fields: %s)", key, url, sorted(fields))
            return None
        try:
            value, label = self.decode(key, fields, epoch)
        except Exception as e:  # noqa: BLE001 - any decode failure skips the sample
            log.warning("skipping corrupt %s %r in %s: %s: %s", self.field, key, url, type(e).__name__, e)
            return None
        return value, label, key


@dataclass(frozen=True)
class ImageCodec(SampleCodec):
    """Image bytes -> center-cropped uint8 (R, R, 3), mirrored by a per-(seed, epoch, key) coin."""

    resolution: int
    random_flip: bool
    seed: int
    field = "image"

    def complete(self, fields: dict[str, bytes]) -> bool:
        return image_complete(fields)

    def decode(self, key: str, fields: dict[str, bytes], epoch: int) -> tuple[np.ndarray, int]:
        img = next(fields[k] for k in IMAGE_FIELDS if k in fields)
        label = int(fields["cls"])
        arr = center_crop_arr(decode_rgb(img), self.resolution)  # = transforms.preprocess, without its flip copy
        return (arr[:, ::-1] if self.random_flip and flip_decision(self.seed, epoch, key) else arr), label

    def collate(self, arrays: list[np.ndarray]) -> torch.Tensor:
        return to_tensor(arrays)


@dataclass(frozen=True)
class TokenCodec(SampleCodec):
    """Raw codes -> int64 (L,) (dtype and length from the index's `tokens` section)."""

    dtype: str  # numpy dtype string, e.g. "<u2"
    seq_len: int
    field = "codes"

    def complete(self, fields: dict[str, bytes]) -> bool:
        return "tok" in fields and "cls" in fields

    def decode(self, key: str, fields: dict[str, bytes], epoch: int) -> tuple[np.ndarray, int]:
        codes, label, _ = decode_token_sample(fields, np.dtype(self.dtype), self.seq_len)
        return codes, label

    def collate(self, arrays: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(arrays))


@dataclass(frozen=True)
class LatentCodec(SampleCodec):
    """A latent-cache sample (system/data/latents.py) -> (view pixels uint8 (R, R, 3), latents
    float16 (C, h, w)); batches get "image" (float (B, 3, R, R) in [-1, 1], exactly the pixels the
    VAE encoded: no flip on top, the cache's views are the augmentation) and "latents" (float32)."""

    resolution: int
    channels: int
    size: int
    field = "latent sample"

    def complete(self, fields: dict[str, bytes]) -> bool:
        return latent_complete(fields)

    def decode(self, key: str, fields: dict[str, bytes], epoch: int) -> tuple[tuple[np.ndarray, np.ndarray], int]:
        pixels, latents, label, _ = decode_latent_sample(fields, self.channels, self.size, self.resolution)
        return (pixels, latents), label

    def batch_fields(self, values: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
        return {"image": to_tensor([p for p, _ in values]),
                "latents": torch.from_numpy(np.stack([z for _, z in values])).float()}
