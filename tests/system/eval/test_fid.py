"""FID numerics (both sqrtm backends), statistics files in the ADM format, streaming stats."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn

from system.eval.fid import (
    StreamingStats,
    feature_stats,
    fid_from_features,
    frechet_distance,
    load_npz_images,
    load_stats,
    reference_stats,
    save_stats,
)
from system.eval.sqrtm import resolve_backend, sqrtm_newton_schulz, sqrtm_psd_torch, trace_sqrt_product

BACKENDS = ["scipy", "torch"]


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift + rng.normal(size=d) * 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_fid_of_a_set_with_itself_is_zero(backend):
    f = _features(400, 32, seed=0)
    assert abs(fid_from_features(f, f, backend=backend)) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_diagonal_gaussians_closed_form(backend):
    rng = np.random.default_rng(1)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    want = float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2)))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), backend=backend)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_covariance_closed_form(backend):
    # S2 = a^2 S1 commutes with S1: tr sqrt(S1 S2) = a tr S1, so FID = (1 - a)^2 tr S1.
    a = np.random.default_rng(2).normal(size=(24, 24))
    s1 = a @ a.T + 0.1 * np.eye(24)
    mu = np.zeros(24)
    got = frechet_distance(mu, s1, mu, 4.0 * s1, backend=backend)
    assert got == pytest.approx(np.trace(s1), rel=1e-8)


def test_torch_path_agrees_with_scipy_on_random_features():
    f1, f2 = _features(300, 64, seed=3), _features(300, 64, seed=4, shift=0.3)
    fid_scipy = fid_from_features(f1, f2, backend="scipy")
    fid_torch = fid_from_features(torch.from_numpy(f1).float(), torch.from_numpy(f2).float(), backend="torch")
    assert fid_scipy > 1.0  # a real distance, not a degenerate zero
    assert abs(fid_torch - fid_scipy) < 1e-3
    mu1, s1 = feature_stats(f1)
    mu2, s2 = feature_stats(f2)
    tr = trace_sqrt_product(s1, s2, backend="torch")
    assert tr == pytest.approx(float(np.trace(scipy.linalg.sqrtm(s1 @ s2).real)), abs=1e-6)


def test_rank_deficient_covariances_stay_finite():
    # fewer samples than dims: singular covariances (the scipy path adds eps on failure)
    f1, f2 = _features(20, 48, seed=5), _features(20, 48, seed=6)
    vals = [fid_from_features(f1, f2, backend=b) for b in BACKENDS]
    assert all(np.isfinite(v) and v > 0 for v in vals)
    assert abs(vals[0] - vals[1]) < 1e-3


def test_matrix_square_roots():
    a = np.random.default_rng(7).normal(size=(32, 32))
    spd = a @ a.T + np.eye(32)
    root = sqrtm_psd_torch(spd).numpy()
    np.testing.assert_allclose(root, scipy.linalg.sqrtm(spd).real, atol=1e-8)
    ns = sqrtm_newton_schulz(torch.from_numpy(spd), num_iters=60).numpy()
    np.testing.assert_allclose(ns @ ns, spd, rtol=1e-6, atol=1e-6)


def test_backend_resolution_and_errors():
    if not torch.cuda.is_available():
        assert resolve_backend("auto")[0] == "scipy"
    assert resolve_backend("torch", "cpu") == ("torch", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("numpy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="feature dims differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        feature_stats(np.full((4, 3), np.nan))
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(np.zeros((1, 3)))


def test_streaming_stats_match_batch_stats_and_merge():
    f = _features(250, 12, seed=8)
    a, b = StreamingStats(12), StreamingStats(12)
    for chunk in np.array_split(f[:130], 4):
        a.update(chunk)
    b.update(torch.from_numpy(f[130:]))
    mu, sigma = a.merge(b).compute()
    mu_ref, sigma_ref = feature_stats(f)
    np.testing.assert_allclose(mu, mu_ref, atol=1e-12)
    np.testing.assert_allclose(sigma, sigma_ref, atol=1e-10)
    with pytest.raises(ValueError, match=r"\(N, 12\)"):
        a.update(np.zeros((3, 5)))


def test_stats_files_in_adm_format(tmp_path):
    f = _features(100, 8, seed=9)
    mu, sigma = feature_stats(f)
    own = tmp_path / "stats.npz"
    save_stats(own, mu, sigma)
    mu2, sigma2 = load_stats(own)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    # ADM reference batch: images + float32 mu/sigma (+ spatial stats we ignore)
    images = np.random.default_rng(0).integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    adm = tmp_path / "VIRTUAL_tiny_labeled.npz"
    np.savez(adm, arr_0=images, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32),
             mu_s=np.zeros(3, np.float32), sigma_s=np.eye(3, dtype=np.float32))
    mu3, sigma3 = load_stats(adm)
    assert mu3.dtype == np.float64 and sigma3.shape == (8, 8)
    assert frechet_distance(mu, sigma, mu3, sigma3) < 1e-4
    np.testing.assert_array_equal(load_npz_images(adm), images)
    only_images = tmp_path / "samples.npz"
    np.savez(only_images, arr_0=images)
    with pytest.raises(KeyError, match="reference_stats"):
        load_stats(only_images)
    with pytest.raises(FileNotFoundError, match="mu"):
        load_stats(tmp_path / "nope.npz")


class _TinyExtractor(nn.Module):
    """Stand-in with InceptionV3FID's interface: (B,3,H,W) -> (features, logits)."""

    pretrained = False

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float() / 255.0
        feats = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return feats, feats @ self.fc.weight.T


def test_reference_stats_featurises_images_for_random_weight_networks(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=images, mu=np.zeros(2048), sigma=np.eye(2048))
    ext = _TinyExtractor()
    mu, sigma = reference_stats(path, ext, batch_size=5)
    assert mu.shape == (6,) and sigma.shape == (6, 6)  # stored 2048-d stats were not used
    feats = ext(torch.from_numpy(images).permute(0, 3, 1, 2))[0].double().numpy()
    np.testing.assert_allclose(mu, feats.mean(0), atol=1e-6)
    assert reference_stats(path)[0].shape == (2048,)  # no extractor: the stored statistics


@pytest.mark.gpu
def test_cuda_torch_path_agrees_with_scipy():
    f1, f2 = _features(3000, 2048, seed=10), _features(3000, 2048, seed=11, shift=0.1)
    mu1, s1 = feature_stats(f1)
    mu2, s2 = feature_stats(f2)
    gpu = frechet_distance(mu1, s1, mu2, s2, backend="torch", device="cuda")
    cpu = frechet_distance(mu1, s1, mu2, s2, backend="scipy")
    assert abs(gpu - cpu) < 1e-3 * max(1.0, abs(cpu))
