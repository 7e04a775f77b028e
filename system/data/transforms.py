"""ImageNet preprocessing used by ADM / LlamaGen / TiTok: center crop + resize, random flip.

PIL + numpy only (no torchvision). Images come out as uint8 HWC arrays; `to_tensor` turns a
stack of them into float (B, 3, R, R) in [-1, 1].
"""
from __future__ import annotations

import hashlib
import io

import numpy as np
import torch
from PIL import Image


def center_crop_arr(img: Image.Image, resolution: int) -> np.ndarray:
    """ADM's center crop: BOX-halve while the short side >= 2R, BICUBIC-resize the short side
    to R, then take the centered R x R window. Returns uint8 (R, R, 3)."""
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution]


def flip_decision(seed: int, epoch: int, key: str) -> bool:
    """Deterministic coin per (seed, epoch, sample key): no worker RNG, so resumes are exact."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return bool(digest[0] & 1)


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes to RGB; raises on corrupt or truncated data."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB") if img.mode != "RGB" else img


def preprocess(data: bytes, resolution: int, flip: bool) -> np.ndarray:
    """Image bytes -> uint8 (R, R, 3), center-cropped and optionally mirrored."""
    arr = center_crop_arr(decode_rgb(data), resolution)
    return np.ascontiguousarray(arr[:, ::-1]) if flip else arr


def five_crop_arr(arr: np.ndarray, size: int) -> list[np.ndarray]:
    """torchvision's FiveCrop on (H, W, 3): top-left, top-right, bottom-left, bottom-right, centre."""
    h, w = arr.shape[:2]
    if size > min(h, w):
        raise ValueError(f"crop size {size} exceeds the image ({h}x{w})")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (top, left)]
    return [np.ascontiguousarray(arr[y : y + size, x : x + size]) for y, x in corners]


def ten_crop_views(img: Image.Image, resolution: int, crop_range: float = 1.1) -> list[np.ndarray]:
    """LlamaGen's pre-tokenization views: ADM-center-crop to int(1.1 R), then torchvision's
    TenCrop(R): the five crops, then the five crops of the mirrored image."""
    big = center_crop_arr(img, int(resolution * crop_range))
    return five_crop_arr(big, resolution) + five_crop_arr(np.ascontiguousarray(big[:, ::-1]), resolution)


def augment_views(data: bytes, resolution: int, mode: str) -> np.ndarray:
    """Image bytes -> the uint8 (V, R, R, 3) views of an augmentation mode: "none" (the center
    crop), "flip" (it and its mirror image) or "ten-crop" (`ten_crop_views`)."""
    img = decode_rgb(data)
    if mode == "ten-crop":
        return np.stack(ten_crop_views(img, resolution))
    arr = center_crop_arr(img, resolution)
    if mode == "none":
        return arr[None]
    if mode == "flip":
        return np.stack([arr, arr[:, ::-1]])
    raise ValueError(f"unknown augmentation mode {mode!r}; expected none, flip or ten-crop")


def to_tensor(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 (B, R, R, 3) -> float32 (B, 3, R, R) in [-1, 1]."""
    batch = torch.from_numpy(np.stack(images) if isinstance(images, list) else np.asarray(images))
    return batch.permute(0, 3, 1, 2).contiguous().float().div_(127.5).sub_(1.0)
