"""PSNR / SSIM / LPIPS hand cases and the running meter."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from skimage.metrics import structural_similarity

from system.eval.recon_metrics import ReconMeter, build_lpips, lpips_distance, psnr, ssim


def _imgs(b: int = 2, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_psnr_hand_cases():
    x = torch.zeros(2, 3, 8, 8)
    assert torch.isinf(psnr(x, x)).all()
    torch.testing.assert_close(psnr(x, x + 0.1), torch.full((2,), 20.0))  # MSE 0.01 -> 20 dB
    torch.testing.assert_close(psnr(x * 255, x + 25.5, data_range=255.0), torch.full((2,), 20.0))
    u8 = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    assert float(psnr(u8, u8 + 1, data_range=255.0)[0]) == pytest.approx(20 * math.log10(255.0))
    with pytest.raises(ValueError, match="data_range=255"):
        psnr(u8, u8)


def test_ssim_identical_is_one_and_matches_scikit_image():
    x, y = _imgs(seed=1), _imgs(seed=2)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    noisy = (x + 0.1 * (y - 0.5)).clamp(0, 1)
    ours = ssim(x, noisy)
    for i in range(2):
        ref = structural_similarity(
            x[i].permute(1, 2, 0).numpy(), noisy[i].permute(1, 2, 0).numpy(), channel_axis=2,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
        )
        assert float(ours[i]) == pytest.approx(ref, abs=1e-6)
    assert 0.0 < float(ours.min()) < 1.0
    # same images on the [0, 255] scale give the same SSIM
    torch.testing.assert_close(ssim(x * 255, noisy * 255, data_range=255.0), ours)
    with pytest.raises(ValueError, match="at least 11px"):
        ssim(x[..., :8, :8], x[..., :8, :8])


@pytest.fixture(scope="module")
def lpips_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_lpips()


def test_lpips_and_meter(lpips_model):
    x, y = _imgs(size=32, seed=3).float(), _imgs(size=32, seed=4).float()
    d_same = lpips_distance(lpips_model, x, x)
    d_diff = lpips_distance(lpips_model, x, y)
    assert d_same.shape == (2,) and torch.allclose(d_same, torch.zeros(2), atol=1e-6)
    assert (d_diff > 0).all()
    meter = ReconMeter(lpips_model)
    meter.update(x[:1], y[:1])
    other = ReconMeter(lpips_model)
    other.update(x[1:], y[1:])
    out = meter.merge(other).compute()
    assert out["num_images"] == 2.0
    assert out["psnr"] == pytest.approx(float(psnr(x, y).mean()), rel=1e-5)
    assert out["ssim"] == pytest.approx(float(ssim(x, y).mean()), rel=1e-5)
    assert out["lpips"] == pytest.approx(float(d_diff.mean()), rel=1e-4)
    no_lpips = ReconMeter()
    no_lpips.update(x, y)
    assert "lpips" not in no_lpips.compute()
    with pytest.raises(ValueError, match="before any update"):
        ReconMeter().compute()
