"""LPIPS: formula properties, gradients, frozen state and public weight-file layouts."""
from __future__ import annotations

import pytest
import torch

from system.losses.lpips import LPIPS, TAP_CHANNELS, _unit_normalize

TV_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM"):
        return LPIPS()


def _imgs(seed: int, n: int = 2, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_identical_images_give_zero(lpips: LPIPS) -> None:
    x = _imgs(1)
    d = lpips(x, x)
    assert d.shape == (2,)
    assert torch.allclose(d, torch.zeros(2), atol=1e-7)


def test_different_images_positive_and_symmetric(lpips: LPIPS) -> None:
    x, y = _imgs(1), _imgs(2)
    d = lpips(x, y)
    assert (d > 1e-4).all()
    assert torch.allclose(d, lpips(y, x), rtol=1e-5)


def test_matches_manual_formula(lpips: LPIPS) -> None:
    x, y = _imgs(3), _imgs(4)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    fx, fy = lpips.net((x - shift) / scale), lpips.net((y - shift) / scale)
    want = torch.zeros(2)
    for i, (a, b) in enumerate(zip(fx, fy)):
        na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = getattr(lpips.heads, f"lin{i}").model[1].weight.view(1, -1, 1, 1)
        want += ((na - nb).pow(2) * w).sum(1).mean(dim=(1, 2))
    assert torch.allclose(lpips(x, y), want, rtol=1e-4, atol=1e-6)


def test_gradient_reaches_input_not_params(lpips: LPIPS) -> None:
    x = _imgs(5).requires_grad_(True)
    lpips(x, _imgs(6)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert all(not p.requires_grad and p.grad is None for p in lpips.parameters())
    lpips.train()
    assert not lpips.training


def test_unit_normalize_gradient_finite_at_zero() -> None:
    f = torch.zeros(1, 4, 2, 2, requires_grad=True)
    _unit_normalize(f).sum().backward()
    assert torch.isfinite(f.grad).all()


def test_bad_shapes_rejected(lpips: LPIPS) -> None:
    with pytest.raises(ValueError, match="B,3,H,W"):
        lpips(_imgs(1), _imgs(1, size=16))


def _torchvision_vgg16_state_dict() -> dict[str, torch.Tensor]:
    chans = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    sd, c_in = {}, 3
    for idx, c in zip(TV_CONV_INDICES, chans):
        sd[f"features.{idx}.weight"] = torch.randn(c, c_in, 3, 3) * 0.05
        sd[f"features.{idx}.bias"] = torch.randn(c) * 0.01
        c_in = c
    sd["classifier.0.weight"] = torch.randn(8, 8)  # stands in for the ignored classifier keys
    sd["classifier.0.bias"] = torch.randn(8)
    return sd


def test_loads_torchvision_and_lpips_layouts(tmp_path) -> None:
    vgg_sd = _torchvision_vgg16_state_dict()
    lin_sd = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(TAP_CHANNELS)}
    torch.save(vgg_sd, tmp_path / "vgg16-397923af.pth")
    torch.save(lin_sd, tmp_path / "vgg.pth")
    m = LPIPS(str(tmp_path / "vgg16-397923af.pth"), str(tmp_path / "vgg.pth"))
    assert m.pretrained
    assert set(m.net.state_dict()) == {k for k in vgg_sd if k.startswith("features.")}
    assert set(m.heads.state_dict()) == set(lin_sd)
    assert torch.equal(m.net.features[28].weight, vgg_sd["features.28.weight"])
    assert torch.equal(m.heads.lin3.model[1].weight, lin_sd["lin3.model.1.weight"])
    assert not any(p.requires_grad for p in m.parameters())


def test_wrong_files_fail_loudly(tmp_path) -> None:
    torch.save({"classifier.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="features"):
        LPIPS(vgg_weights=str(tmp_path / "bad.pth"), lin_weights=None)
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "short.pth")
    with pytest.raises(RuntimeError, match="lin1"):
        LPIPS(lin_weights=str(tmp_path / "short.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        LPIPS(vgg_weights=str(tmp_path / "nope.pth"))


@pytest.mark.gpu
def test_lpips_cuda_bf16_autocast(lpips: LPIPS) -> None:
    m = lpips.to("cuda")  # reuse the module-scoped weights on the GPU
    x = (torch.rand(2, 3, 64, 64, device="cuda") * 2 - 1).requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        d = m(x, torch.rand_like(x) * 2 - 1)
    d.sum().backward()
    assert d.dtype == torch.float32 and (d > 0).all() and torch.isfinite(x.grad).all()
    lpips.to("cpu")
