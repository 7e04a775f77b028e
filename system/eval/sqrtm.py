"""Matrix square roots and the FID trace term tr(sqrt(S1 S2)).

Two backends:
- ``"scipy"``: ``scipy.linalg.sqrtm`` of the (non-symmetric) product S1 S2 on CPU, the way the
  reference FID code does it (Schur method; the small imaginary part is dropped after a check).
- ``"torch"``: symmetric eigen-decompositions in float64, on any device. For PSD S1, S2 the
  eigenvalues of S1 S2 equal those of the symmetric PSD matrix A = sqrt(S1) S2 sqrt(S1), so
  tr(sqrt(S1 S2)) = sum_i sqrt(max(lambda_i(A), 0)). No non-symmetric square root is needed,
  which makes this path both fast on GPU and numerically stable.
``"auto"`` picks torch on CUDA when a GPU is present, scipy otherwise.
"""
from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch

Backend = Literal["auto", "scipy", "torch"]
ArrayLike = np.ndarray | torch.Tensor


def _as_numpy64(a: ArrayLike, name: str) -> np.ndarray:
    arr = a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{name} must be a square matrix; got shape {arr.shape}")
    return arr


def _as_torch64(a: ArrayLike, device: torch.device | str | None) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))
    return t.to(device=device, dtype=torch.float64)


def resolve_backend(backend: Backend, device: torch.device | str | None = None) -> tuple[str, torch.device]:
    """Map ``backend``/``device`` to a concrete (backend, device) pair."""
    if backend not in ("auto", "scipy", "torch"):
        raise ValueError(f"backend must be 'auto', 'scipy' or 'torch'; got {backend!r}")
    if backend == "auto":
        if device is not None:
            backend = "torch" if torch.device(device).type == "cuda" else "scipy"
        else:
            backend = "torch" if torch.cuda.is_available() else "scipy"
    if device is None:
        device = "cuda" if backend == "torch" and torch.cuda.is_available() else "cpu"
    return backend, torch.device(device)


def sqrtm_scipy(a: ArrayLike) -> np.ndarray:
    """Principal square root of a general square matrix (scipy, CPU). May be complex."""
    from scipy import linalg

    return linalg.sqrtm(_as_numpy64(a, "a"))


def sqrtm_psd_torch(a: ArrayLike, device: torch.device | str | None = None) -> torch.Tensor:
    """Square root of a symmetric PSD matrix by eigh (float64); negative round-off eigenvalues -> 0."""
    t = _as_torch64(a, device)
    if t.dim() != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"a must be a square matrix; got shape {tuple(t.shape)}")
    t = 0.5 * (t + t.T)
    evals, evecs = torch.linalg.eigh(t)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def sqrtm_newton_schulz(a: torch.Tensor, num_iters: int = 50) -> torch.Tensor:
    """Coupled Newton-Schulz iteration for sqrt(A), A with positive real eigenvalues.

    Converges when ||I - A/||A||_F|| < 1 (true for SPD and for products of SPD matrices that are
    not too ill-conditioned); matmul-only, so it runs in any dtype on any device.
    """
    if a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"a must be a square matrix; got shape {tuple(a.shape)}")
    norm = torch.linalg.matrix_norm(a)
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    y, z = a / norm, eye.clone()
    for _ in range(num_iters):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return y * norm.sqrt()


def _trace_sqrt_scipy(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sqrtm(S1 S2) is singular; adding {eps} to the covariance diagonals", stacklevel=3)
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if max_imag > 1e-3:
            raise ValueError(
                f"FID: sqrtm(S1 S2) has an imaginary diagonal component of {max_imag:.3g} (> 1e-3); "
                "the covariances are not valid PSD matrices (too few samples or NaN features?)"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_torch(s1: ArrayLike, s2: ArrayLike, device: torch.device) -> float:
    root1 = sqrtm_psd_torch(s1, device)
    t2 = _as_torch64(s2, device)
    m = root1 @ (0.5 * (t2 + t2.T)) @ root1
    evals = torch.linalg.eigvalsh(0.5 * (m + m.T))
    return float(evals.clamp_min(0).sqrt().sum())


def trace_sqrt_product(
    sigma1: ArrayLike,
    sigma2: ArrayLike,
    backend: Backend = "auto",
    device: torch.device | str | None = None,
    eps: float = 1e-6,
) -> float:
    """tr(sqrt(sigma1 @ sigma2)) for two covariance matrices of the same size."""
    shape1, shape2 = tuple(sigma1.shape), tuple(sigma2.shape)
    if len(shape1) != 2 or shape1[0] != shape1[1] or shape1 != shape2:
        raise ValueError(f"sigma1 and sigma2 must be square matrices of one shape; got {shape1} and {shape2}")
    name, dev = resolve_backend(backend, device)
    if name == "scipy":
        return _trace_sqrt_scipy(_as_numpy64(sigma1, "sigma1"), _as_numpy64(sigma2, "sigma2"), eps)
    return _trace_sqrt_torch(sigma1, sigma2, dev)
