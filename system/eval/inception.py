"""InceptionV3 feature extractor for FID / IS, laid out like the TF "2015-12-05" graph port.

State-dict keys and shapes match the public pytorch-fid weight file
``pt_inception-2015-12-05-6726825d.pth`` (``Conv2d_1a_3x3.conv.weight`` ... ``Mixed_7c.*``,
``fc.weight`` (1008, 2048), ``fc.bias``; no aux head), so that file loads with ``strict=True``.
Differences of this network from the ImageNet InceptionV3 (all reproduced here):
- the 3x3 average pools inside the A/C/E blocks ignore padded zeros (``count_include_pad=False``);
- the last block (Mixed_7c) pools its side branch with a 3x3 *max* pool;
- 1008 classes; IS uses logits without the fc bias, as the TF/ADM Inception-score code does.

Pre-processing (``preprocess``):
- ``"adm"`` (default): bilinear resize to 299 with TF1's legacy sampling (no half-pixel offset) and
  (v - 128) / 128 on 0..255 values: what ADM's TF evaluator and torch-fidelity feed the network.
- ``"pytorch-fid"``: ``F.interpolate(bilinear, align_corners=False)`` and 2x - 1.
Without a weight file the network is random (fixed seed, ``pretrained=False``): fine for tests and
the embedded default, but not a real FID; reports must say so.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURE_DIM = 2048
NUM_CLASSES = 1008
INPUT_SIZE = 299
RANDOM_INIT_SEED = 0
RANDOM_WEIGHTS_LABEL = "random-weight Inception (not a real FID)"
Preprocess = Literal["adm", "pytorch-fid"]


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU; keys ``conv.weight``, ``bn.*``."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TF averages only over the in-image part of the window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1. Out: 224 + pool_features."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction (Mixed_6a). Out: 384 + 96 + c_in."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convs (c7 channels inside). Out: 768."""

    def __init__(self, c_in: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction (Mixed_7a). Out: 320 + 192 + c_in."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 branches. Out: 2048. ``pool="max"`` for the last block (FID graph)."""

    def __init__(self, c_in: int, pool: Literal["avg", "max"]) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else _avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


def _tf1_resize_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n_out, n_in) interpolation matrix of TF1 ``resize_bilinear`` (align_corners=False, legacy centres)."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo.double()
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m.to(device=device, dtype=dtype)


def resize_tf1(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:  # (B,C,H,W) -> (B,C,size,size)
    if x.shape[-2:] == (size, size):
        return x
    ry = _tf1_resize_matrix(x.shape[-2], size, x.device, x.dtype)
    rx = _tf1_resize_matrix(x.shape[-1], size, x.device, x.dtype)
    return torch.einsum("ih,bchw,jw->bcij", ry, x, rx)


class InceptionV3FID(nn.Module):
    """images -> (pool3 features (B, 2048), logits (B, 1008)).

    ``forward`` takes (B, 3, H, W) images, float in [0, 1] or uint8 in [0, 255], any H, W >= 75
    before the resize (they are resized to 299 inside). Parameters are frozen; always in eval mode.
    """

    def __init__(self, weights_path: str | Path | None = None, preprocess: Preprocess = "adm") -> None:
        super().__init__()
        if preprocess not in ("adm", "pytorch-fid"):
            raise ValueError(f"preprocess must be 'adm' or 'pytorch-fid'; got {preprocess!r}")
        self.preprocess = preprocess
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.pretrained: bool = weights_path is not None
        if weights_path is not None:
            self.load_weights(weights_path)
        else:
            self._random_init()
            warnings.warn(f"InceptionV3FID built with random weights: {RANDOM_WEIGHTS_LABEL}.", stacklevel=2)
        self.requires_grad_(False)
        self.eval()

    @property
    def label(self) -> str:
        """How reports should name this network's FID/IS."""
        return "Inception-v3 (pt_inception-2015-12-05)" if self.pretrained else RANDOM_WEIGHTS_LABEL

    @torch.no_grad()
    def _random_init(self) -> None:
        """Deterministic (seeded) init so every worker's random-weight network is identical."""
        if any(p.is_meta for p in self.parameters()):
            return
        g = torch.Generator().manual_seed(RANDOM_INIT_SEED)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He init keeps activations O(1) through BN-in-eval (= identity)
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
                m.bias.zero_()

    def load_weights(self, path: str | Path) -> None:
        """Load the pytorch-fid ``pt_inception-2015-12-05`` state dict (.pth or .safetensors), strict."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weight file not found: {path} (expected pt_inception-2015-12-05-6726825d.pth)")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        try:
            self.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise RuntimeError(
                f"{path} is not a pytorch-fid FID-Inception state dict (torchvision's inception_v3_google is a "
                f"different network and does not fit): {e}"
            ) from e
        self.pretrained = True

    def train(self, mode: bool = True) -> "InceptionV3FID":
        return super().train(False)  # frozen metric network: BN always uses running stats

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"InceptionV3FID expects (B, 3, H, W) images; got shape {tuple(x.shape)}")
        dtype = self.fc.weight.dtype
        x = x.to(dtype) / 255.0 if x.dtype == torch.uint8 else x.to(dtype)
        if self.preprocess == "adm":
            return (resize_tf1(x) * 255.0 - 128.0) / 128.0
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B,3,H,W) -> (B,2048), (B,1008)
        x = self._prepare(x)  # (B,3,299,299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B,64,147,147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B,64,73,73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B,192,71,71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B,192,35,35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B,288,35,35)
        x = self.Mixed_6a(x)  # (B,768,17,17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B,768,17,17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B,2048,8,8)
        pool = x.mean(dim=(2, 3))  # (B,2048)
        logits = pool @ self.fc.weight.T  # (B,1008), no bias (as the IS reference code)
        return pool, logits


def _batches(images: np.ndarray | torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """numpy arrays are ADM-format uint8 (N, H, W, 3); tensors are (N, 3, H, W) uint8 or float [0, 1]."""
    n = images.shape[0]
    for i in range(0, n, batch_size):
        chunk = images[i : i + batch_size]
        if isinstance(chunk, np.ndarray):
            if chunk.ndim != 4 or chunk.shape[-1] != 3:
                raise ValueError(f"numpy images must be (N, H, W, 3) uint8 (ADM npz layout); got {chunk.shape}")
            chunk = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2)
        yield chunk


@torch.inference_mode()
def extract_features(
    model: InceptionV3FID,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 100,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """All images -> (pool3 features (N, 2048), logits (N, 1008)) as float32 numpy arrays."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    device = torch.device(device) if device is not None else model.fc.weight.device
    model = model.to(device)
    feats, logits = [], []
    for chunk in _batches(images, batch_size):
        f, lg = model(chunk.to(device, non_blocking=True))
        feats.append(f.float().cpu().numpy())
        logits.append(lg.float().cpu().numpy())
    if not feats:
        raise ValueError("extract_features got no images")
    return np.concatenate(feats), np.concatenate(logits)
