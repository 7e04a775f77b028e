"""PatchGAN discriminator, hinge losses, LeCam, adaptive weight and warm-up."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from system.losses.gan import (
    DiscriminatorConfig,
    GANLoss,
    GANLossConfig,
    LeCamEMA,
    PatchDiscriminator,
    adaptive_gan_weight,
    gan_start_factor,
    hinge_d_loss,
    hinge_g_loss,
)


def test_hinge_values_by_hand() -> None:
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.5])
    # relu(1-real) = [0, .5] -> .25 ; relu(1+fake) = [0, 1.5] -> .75 ; 0.5 * (.25 + .75)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)
    assert hinge_g_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(-2.0)


def test_lecam_ema_and_penalty_by_hand() -> None:
    lc = LeCamEMA(decay=0.9)
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -1.0])
    pen = lc(real, fake)  # EMAs first: real 0.1*2 = 0.2, fake 0.1*-1 = -0.1
    assert lc.ema_real.item() == pytest.approx(0.2)
    assert lc.ema_fake.item() == pytest.approx(-0.1)
    # mean(relu(real - (-0.1))^2) = (1.1^2 + 3.1^2)/2 ; mean(relu(0.2 - fake)^2) = 1.2^2
    assert pen.item() == pytest.approx((1.21 + 9.61) / 2 + 1.44, rel=1e-6)
    assert lc(real, fake, update=False).item() == pytest.approx(pen.item())  # no update -> same EMAs
    assert set(lc.state_dict()) == {"ema_real", "ema_fake"}
    with pytest.raises(ValueError, match="decay"):
        LeCamEMA(decay=1.0)


def test_discriminator_patch_shape_and_norms() -> None:
    d = PatchDiscriminator(DiscriminatorConfig(ndf=8))
    assert d(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    assert any(isinstance(m, nn.GroupNorm) for m in d.modules())  # default norm
    bn = PatchDiscriminator(DiscriminatorConfig(ndf=8, norm="batch"))
    keys = set(bn.state_dict())  # taming NLayerDiscriminator layout
    assert {"main.0.weight", "main.0.bias", "main.2.weight", "main.3.running_mean", "main.11.weight"} <= keys
    assert "main.2.bias" not in keys  # conv before BatchNorm has no bias
    plain = PatchDiscriminator(DiscriminatorConfig(ndf=8, norm="none"))
    assert not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) for m in plain.modules())
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(DiscriminatorConfig(norm="layer"))  # type: ignore[arg-type]


def test_adaptive_weight_by_hand_and_clamp() -> None:
    w = torch.ones(2, requires_grad=True)
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.6, 0.8])
    nll, g = (a * w).sum(), (b * w).sum()  # grads a (norm 5) and b (norm 1)
    out = adaptive_gan_weight(nll, g, w)
    assert out.item() == pytest.approx(5.0 / (1.0 + 1e-4), rel=1e-6)
    assert not out.requires_grad
    (nll + g).backward()  # graph retained for the real backward
    assert torch.equal(w.grad, a + b)
    w2 = torch.ones(2, requires_grad=True)
    clamped = adaptive_gan_weight((a * w2).sum(), (0.0 * w2).sum(), w2, max_weight=10.0)
    assert clamped.item() == 10.0
    with pytest.raises(ValueError, match="last_layer"):
        adaptive_gan_weight(nll, g, torch.ones(2))


def test_gan_start_factor() -> None:
    assert gan_start_factor(9, 10) == 0.0
    assert gan_start_factor(10, 10) == 1.0


def _tiny_gan(**kw) -> GANLoss:
    torch.manual_seed(0)
    return GANLoss(GANLossConfig(disc=DiscriminatorConfig(ndf=8, n_layers=2, num_groups=4), **kw))


def test_generator_loss_warmup_and_gradient() -> None:
    gan = _tiny_gan(weight=0.5, gan_start_step=5)
    fake = torch.randn(2, 3, 32, 32, requires_grad=True)
    loss0, _ = gan.generator_loss(fake, step=4)
    assert loss0.item() == 0.0
    loss, m = gan.generator_loss(fake, step=5)
    assert loss.item() == pytest.approx(0.5 * m["gan/g_loss"].item(), rel=1e-6)
    loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_adaptive_generator_loss_uses_last_layer() -> None:
    gan = _tiny_gan(weight=0.1, adaptive=True)
    dec = nn.Conv2d(4, 3, 1)
    fake = dec(torch.randn(2, 4, 32, 32))
    nll = (fake - 0.3).abs().mean()
    loss, m = gan.generator_loss(fake, step=0, nll_loss=nll, last_layer=dec.weight)
    expect = 0.1 * adaptive_gan_weight(nll, hinge_g_loss(gan.disc(fake)), dec.weight)
    assert m["gan/g_weight"].item() == pytest.approx(expect.item(), rel=1e-4)
    (nll + loss).backward()
    assert dec.weight.grad is not None
    with pytest.raises(ValueError, match="nll_loss and last_layer"):
        gan.generator_loss(fake, step=0)


def test_discriminator_loss_lecam_and_detach() -> None:
    gan = _tiny_gan(lecam_weight=0.05, gan_start_step=3)
    real = torch.randn(2, 3, 32, 32)
    src = torch.randn(2, 3, 32, 32, requires_grad=True)
    fake = src * 2
    zero, _ = gan.discriminator_loss(real, fake, step=2)
    assert zero.item() == 0.0
    ema_before = gan.lecam.ema_real.clone()
    loss, m = gan.discriminator_loss(real, fake, step=3)
    assert loss.item() == pytest.approx(m["gan/d_loss"].item() + 0.05 * m["gan/lecam"].item(), rel=1e-5)
    assert not torch.equal(gan.lecam.ema_real, ema_before)  # training mode updates the EMA
    loss.backward()
    assert src.grad is None  # fake images are detached for the D step
    assert gan.disc.main[0].weight.grad is not None
    gan.eval()
    ema = gan.lecam.ema_real.clone()
    gan.discriminator_loss(real, fake, step=3)
    assert torch.equal(gan.lecam.ema_real, ema)  # eval mode leaves the EMA alone
