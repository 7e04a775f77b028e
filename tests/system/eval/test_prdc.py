"""Improved precision/recall (k=3) and density/coverage on hand-made point sets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from system.eval.prdc import knn_radii, precision_recall


def _cloud(n: int, d: int, seed: int, center: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) + center


def test_knn_radii_on_a_line():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]], dtype=torch.float64)
    torch.testing.assert_close(knn_radii(x, k=1), torch.tensor([1.0, 1.0, 4.0, 9.0, 16.0], dtype=torch.float64))
    torch.testing.assert_close(knn_radii(x, k=2, batch_size=2), torch.tensor([9.0, 4.0, 9.0, 16.0, 49.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="k must be"):
        knn_radii(x, k=5)


def test_identical_sets_give_full_precision_and_recall():
    x = _cloud(60, 8, seed=0)
    out = precision_recall(x, x.copy(), batch_size=16)
    assert out["precision"] == 1.0 and out["recall"] == 1.0 and out["coverage"] == 1.0
    assert out["density"] >= 1.0 / 3.0


def test_disjoint_far_sets_give_zero():
    out = precision_recall(_cloud(50, 8, seed=1), _cloud(50, 8, seed=2, center=1000.0))
    assert out == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_mode_dropping_lowers_recall_not_precision():
    a, b = _cloud(20, 4, seed=3), _cloud(20, 4, seed=4, center=100.0)
    real = np.concatenate([a, b])
    fake = a.copy()  # generator covers only mode A
    out = precision_recall(real, fake, k=3, batch_size=7)
    assert out["precision"] == 1.0
    assert out["recall"] == pytest.approx(0.5)
    assert out["coverage"] == pytest.approx(0.5)
    swapped = precision_recall(fake, real, k=3)  # roles swapped: half the "generated" points are off-manifold
    assert swapped["precision"] == pytest.approx(0.5) and swapped["recall"] == 1.0


def test_batching_does_not_change_results():
    real, fake = _cloud(70, 6, seed=5), _cloud(55, 6, seed=6, center=0.7)
    full = precision_recall(real, fake, batch_size=1000)
    small = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), batch_size=9)
    assert full == small
    assert 0.0 < full["precision"] < 1.0 and 0.0 < full["recall"] < 1.0
    with pytest.raises(ValueError, match="dims differ"):
        precision_recall(real, fake[:, :5])
