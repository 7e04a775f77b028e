"""Reconstruction metrics: PSNR, SSIM, LPIPS, and a running meter over batches.

Value range is one explicit rule: images are (B, 3, H, W) on the scale given by ``data_range``
(1.0 for float images in [0, 1], 255.0 for [0, 255]); uint8 tensors count as [0, 255] and need
``data_range=255``. LPIPS (which wants [-1, 1]) gets its inputs rescaled from that range.
SSIM follows Wang et al. 2004: 11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03, "valid"
filtering, mean over pixels and channels; equal to scikit-image's ``structural_similarity(...,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from system.losses.lpips import LPIPS


def _prep(x: torch.Tensor, y: torch.Tensor, data_range: float, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"{who} expects two (B, C, H, W) images of one shape; got {tuple(x.shape)} and {tuple(y.shape)}")
    if (x.dtype == torch.uint8 or y.dtype == torch.uint8) and data_range != 255:
        raise ValueError(f"{who}: uint8 images are on [0, 255]; pass data_range=255 (got {data_range})")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(dtype), y.to(dtype)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, (B,); identical images give +inf."""
    x, y = _prep(x, y, data_range, "psnr")
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def ssim(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5,
    k1: float = 0.01, k2: float = 0.03,
) -> torch.Tensor:
    """Per-image mean SSIM, (B,); identical images give 1."""
    x, y = _prep(x, y, data_range, "ssim")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"ssim: images must be at least {win_size}px per side; got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    g = _gaussian_window(win_size, sigma, x.dtype, x.device)
    wy, wx = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable valid filtering per channel
        return F.conv2d(F.conv2d(t, wy, groups=c), wx, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1)


def build_lpips(vgg_weights: str | None = None, lin_weights: str | None = None) -> "LPIPS":
    """LPIPS network (random weights, with a warning, when paths are missing)."""
    from system.losses.lpips import LPIPS  # lazy: keeps PSNR/SSIM free of the VGG module

    return LPIPS(vgg_weights=vgg_weights, lin_weights=lin_weights)


@torch.no_grad()
def lpips_distance(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image LPIPS, (B,), for images on [0, data_range]."""
    x, y = _prep(x, y, data_range, "lpips")
    dev = next(model.parameters()).device
    return model(x.to(dev) * (2.0 / data_range) - 1.0, y.to(dev) * (2.0 / data_range) - 1.0).float().cpu()


class ReconMeter:
    """Accumulates per-image PSNR/SSIM/LPIPS over batches; mean via ``compute()``; mergeable."""

    def __init__(self, lpips_model: torch.nn.Module | None = None, data_range: float = 1.0) -> None:
        self.lpips_model = lpips_model
        self.data_range = data_range
        self.sums: dict[str, float] = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
        self.n = 0

    @torch.no_grad()
    def update(self, real: torch.Tensor, recon: torch.Tensor) -> None:
        real, recon = real.detach(), recon.detach()
        self.sums["psnr"] += float(psnr(real, recon, self.data_range).sum())
        self.sums["ssim"] += float(ssim(real, recon, self.data_range).sum())
        if self.lpips_model is not None:
            self.sums["lpips"] += float(lpips_distance(self.lpips_model, real, recon, self.data_range).sum())
        self.n += real.shape[0]

    def merge(self, other: "ReconMeter") -> "ReconMeter":
        for key in self.sums:
            self.sums[key] += other.sums[key]
        self.n += other.n
        return self

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("ReconMeter.compute() before any update()")
        out = {k: v / self.n for k, v in self.sums.items() if k != "lpips" or self.lpips_model is not None}
        out["num_images"] = float(self.n)
        return out
