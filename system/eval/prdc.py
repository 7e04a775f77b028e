"""Improved precision/recall (Kynkaanniemi et al. 2019, k=3, as ADM's evaluator) plus density/coverage.

Each set's manifold is the union of balls around its points with radius = distance to the k-th
nearest other point of the same set. Precision: fraction of generated points inside the real
manifold; recall: fraction of real points inside the generated manifold. Density/coverage
(Naeem et al. 2020) reuse the real balls. Distances are computed in row blocks, never all at once.
"""
from __future__ import annotations

import numpy as np
import torch


def _to_tensor(x: np.ndarray | torch.Tensor, device: torch.device, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.dim() != 2:
        raise ValueError(f"{name} must be (N, D) features; got shape {tuple(t.shape)}")
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    return t.to(device=device, dtype=dtype)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (n,D),(m,D) -> (n,m)
    d = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None, :] - 2.0 * (a @ b.T)
    return d.clamp_min_(0)


def knn_radii(features: torch.Tensor, k: int = 3, batch_size: int = 1024) -> torch.Tensor:
    """(N, D) -> (N,) squared distance of each point to its k-th nearest *other* point."""
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N-1={n - 1}]; got k={k}")
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    for i in range(0, n, batch_size):
        d = _sq_dists(features[i : i + batch_size], features)
        # the point itself is the 0-th neighbour (distance 0), so the k-th other point is index k.
        radii[i : i + batch_size] = d.kthvalue(k + 1, dim=1).values
    return radii


def _in_manifold(query: torch.Tensor, ref: torch.Tensor, ref_radii: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(Q,) bool: query point lies in some ball of ``ref``."""
    out = torch.empty(query.shape[0], dtype=torch.bool, device=query.device)
    for i in range(0, query.shape[0], batch_size):
        out[i : i + batch_size] = (_sq_dists(query[i : i + batch_size], ref) <= ref_radii[None, :]).any(dim=1)
    return out


@torch.no_grad()
def precision_recall(
    real: np.ndarray | torch.Tensor,
    fake: np.ndarray | torch.Tensor,
    k: int = 3,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Real (N, D) and generated (M, D) features -> {precision, recall, density, coverage}."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    r, f = _to_tensor(real, dev, "real"), _to_tensor(fake, dev, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real and fake feature dims differ: {r.shape[1]} vs {f.shape[1]}")
    r_radii, f_radii = knn_radii(r, k, batch_size), knn_radii(f, k, batch_size)

    inside_count = torch.zeros(f.shape[0], dtype=torch.float64, device=dev)  # real balls holding each fake
    nearest_fake = torch.full((r.shape[0],), float("inf"), dtype=r.dtype, device=dev)  # per real point
    for i in range(0, f.shape[0], batch_size):
        d = _sq_dists(f[i : i + batch_size], r)  # (b, N)
        inside_count[i : i + batch_size] = (d <= r_radii[None, :]).sum(dim=1).double()
        nearest_fake = torch.minimum(nearest_fake, d.min(dim=0).values)
    recall = _in_manifold(r, f, f_radii, batch_size).double().mean()
    return {
        "precision": float((inside_count > 0).double().mean()),
        "recall": float(recall),
        "density": float(inside_count.sum() / (k * f.shape[0])),
        "coverage": float((nearest_fake <= r_radii).double().mean()),
    }
