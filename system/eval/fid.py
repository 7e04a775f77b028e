"""Frechet Inception Distance from features or stored statistics (ADM reference-batch npz format).

ADM's reference batches (e.g. ``VIRTUAL_imagenet256_labeled.npz``) hold ``arr_0`` (uint8 images,
N x H x W x 3), ``mu`` (D,) and ``sigma`` (D, D) of the pool3 features (plus spatial ``mu_s`` /
``sigma_s``, unused here). Statistics npz files written by :func:`save_stats` use the same
``mu``/``sigma`` keys, so either kind loads with :func:`load_stats`.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)); covariances use ddof=1 like the
reference implementations.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from system.eval.sqrtm import Backend, trace_sqrt_product

if TYPE_CHECKING:
    from system.eval.inception import InceptionV3FID

ArrayLike = np.ndarray | torch.Tensor


def _np(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float64)


def _features64(features: ArrayLike, name: str = "features") -> np.ndarray:
    arr = _np(features)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a (N, D) array; got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples for a covariance; got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return arr


def feature_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mu (D,), sigma (D, D)) in float64."""
    arr = _features64(features)
    return arr.mean(axis=0), np.cov(arr, rowvar=False)


class StreamingStats:
    """Running mean/covariance over feature batches; mergeable across workers (float64 sums)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.n = 0
        self.sum = np.zeros(dim, dtype=np.float64)
        self.outer = np.zeros((dim, dim), dtype=np.float64)

    def update(self, features: ArrayLike) -> "StreamingStats":
        arr = _np(features)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}); got shape {arr.shape}")
        self.n += arr.shape[0]
        self.sum += arr.sum(axis=0)
        self.outer += arr.T @ arr
        return self

    def merge(self, other: "StreamingStats") -> "StreamingStats":
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dim {other.dim} into dim {self.dim}")
        self.n += other.n
        self.sum += other.sum
        self.outer += other.outer
        return self

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 samples for a covariance; have {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, 0.5 * (sigma + sigma.T)


def _check_stats(mu: np.ndarray, sigma: np.ndarray, which: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{which}: expected mu (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}")


def frechet_distance(
    mu1: ArrayLike,
    sigma1: ArrayLike,
    mu2: ArrayLike,
    sigma2: ArrayLike,
    backend: Backend = "auto",
    device: torch.device | str | None = None,
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    m1, m2 = np.atleast_1d(_np(mu1)), np.atleast_1d(_np(mu2))
    s1, s2 = np.atleast_2d(_np(sigma1)), np.atleast_2d(_np(sigma2))
    _check_stats(m1, s1, "stats 1")
    _check_stats(m2, s2, "stats 2")
    if m1.shape != m2.shape:
        raise ValueError(f"feature dims differ: {m1.shape[0]} vs {m2.shape[0]} (same Inception layer on both sides?)")
    diff = m1 - m2
    tr_covmean = trace_sqrt_product(s1, s2, backend=backend, device=device)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)



def fid_from_features(
    features1: ArrayLike, features2: ArrayLike, backend: Backend = "auto", device: torch.device | str | None = None
) -> float:
    """FID between two (N, D) feature sets. With backend "auto" and few samples (max(N1, N2) <= D)
    it is computed exactly without a D x D square root: with A_i the centred features / sqrt(N_i - 1),
    S_i = A_i^T A_i, and the eigenvalues of S1 S2 are the squared singular values of A1 A2^T, so
    tr sqrt(S1 S2) = ||A1 A2^T||_* (nuclear norm)."""
    a, b = _features64(features1, "features1"), _features64(features2, "features2")
    if backend != "auto" or max(len(a), len(b)) > a.shape[1]:
        return frechet_distance(*feature_stats(a), *feature_stats(b), backend=backend, device=device)
    mu1, mu2 = a.mean(0), b.mean(0)
    a1, a2 = (a - mu1) / np.sqrt(len(a) - 1), (b - mu2) / np.sqrt(len(b) - 1)
    tr_sqrt = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    return float(((mu1 - mu2) ** 2).sum() + (a1**2).sum() + (a2**2).sum() - 2.0 * tr_sqrt)


def save_stats(path: str | Path, mu: ArrayLike, sigma: ArrayLike, **extra: np.ndarray) -> None:
    """Write ``mu``/``sigma`` (and any extra arrays) as an npz readable by :func:`load_stats`."""
    m, s = _np(mu), _np(sigma)
    _check_stats(m, s, str(path))
    np.savez(path, mu=m, sigma=s, **extra)


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read (mu, sigma) from an ADM reference batch or a :func:`save_stats` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID statistics file not found: {path} (expected an npz with 'mu' and 'sigma')")
    with np.load(path) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            hint = " It holds images ('arr_0'): use reference_stats(path, extractor)." if "arr_0" in f.files else ""
            raise KeyError(f"{path}: no 'mu'/'sigma' arrays (keys: {f.files}).{hint}")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    _check_stats(mu, sigma, str(path))
    return mu, sigma


def load_npz_images(path: str | Path, key: str = "arr_0") -> np.ndarray:
    """uint8 (N, H, W, 3) images of an ADM-format npz (sample or reference batch)."""
    with np.load(path) as f:
        if key not in f.files:
            raise KeyError(f"{path}: no {key!r} array (keys: {f.files}); expected ADM-format images")
        images = f[key]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}[{key!r}]: expected (N, H, W, 3) images; got shape {images.shape}")
    return images


def reference_stats(
    path: str | Path,
    extractor: "InceptionV3FID | None" = None,
    batch_size: int = 100,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Stored (mu, sigma) when the npz has them; else statistics of its ``arr_0`` images via ``extractor``.

    Stored statistics are only meaningful with the real Inception weights: pass an extractor with
    random weights and the images are featurised instead, so both sides use the same network.
    """
    with np.load(path) as f:
        has_stats = "mu" in f.files and "sigma" in f.files
    if has_stats and (extractor is None or extractor.pretrained):
        return load_stats(path)
    if extractor is None:
        raise ValueError(f"{path}: no 'mu'/'sigma' stored; pass an Inception extractor to featurise 'arr_0'")
    from system.eval.inception import extract_features

    feats, _ = extract_features(extractor, load_npz_images(path), batch_size=batch_size, device=device)
    return feature_stats(feats)
