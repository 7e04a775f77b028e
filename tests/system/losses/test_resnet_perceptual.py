"""ResNet logit perceptual term (tiny random net): the shared logit-MSE formula, gradients to the
prediction only, a frozen network, weight files in transformers' layout, and the clear errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from system.config.methods import ResNetNetConfig  # noqa: E402
from system.losses.resnet_perceptual import RESNET_SIZES, ResNetPerceptual, resnet_config  # noqa: E402


@pytest.fixture(scope="module")
def net() -> ResNetPerceptual:
    """The tiny random net (size "debug")."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM"):
        return ResNetPerceptual(None, size="debug")


def _imgs(seed: int) -> torch.Tensor:  # (2, 3, 32, 32) in [-1, 1]
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_config_defaults_and_the_resnet50_shape() -> None:
    assert ResNetNetConfig() == ResNetNetConfig(path=None, random_init=False, size="50")
    cfg = resnet_config("50")
    assert (list(cfg.depths), list(cfg.hidden_sizes), cfg.embedding_size, cfg.layer_type, cfg.num_labels) == (
        [3, 4, 6, 3], [256, 512, 1024, 2048], 64, "bottleneck", 1000)
    assert set(RESNET_SIZES) == {"50", "debug"}
    with pytest.raises(ValueError, match="ResNet size"):
        resnet_config("18")


def test_zero_for_identical_positive_otherwise(net: ResNetPerceptual) -> None:
    x = _imgs(1)
    d = net(x, x)
    assert d.shape == () and float(d) == 0.0
    assert float(net(x, _imgs(2))) > 0
    assert net.net.config.num_labels == 16 and not net.pretrained


def test_matches_the_logit_mse_formula(net: ResNetPerceptual) -> None:
    x, y = _imgs(3), _imgs(4)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def logits(im):
        im = F.interpolate((im + 1) / 2, size=224, mode="bilinear", align_corners=False, antialias=True)
        return net.net(pixel_values=(im - mean) / std).logits

    torch.testing.assert_close(net(x, y), F.mse_loss(logits(x), logits(y)))


def test_gradient_reaches_pred_not_the_network(net: ResNetPerceptual) -> None:
    x, y = _imgs(5).requires_grad_(True), _imgs(6).requires_grad_(True)
    net(x, y).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert y.grad is None  # the target's logits are computed without a graph
    assert all(not p.requires_grad and p.grad is None for p in net.parameters())
    net.train()
    assert not net.training and not net.net.training
    with pytest.raises(ValueError, match="ResNetPerceptual expects two"):
        net(_imgs(5), _imgs(6)[:1])


def test_loads_saved_weights(tmp_path, net: ResNetPerceptual) -> None:
    from safetensors.torch import save_file

    x, y = _imgs(7), _imgs(8)
    want = net(x, y)
    sd = net.net.state_dict()
    torch.save(sd, tmp_path / "hf.pt")
    torch.save({"state_dict": {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}},
               tmp_path / "wrapped.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "hf.safetensors"))
    net.net.save_pretrained(str(tmp_path / "folder"))
    for name in ("hf.pt", "wrapped.pth", "hf.safetensors", "folder"):
        other = ResNetPerceptual(str(tmp_path / name), size="debug")
        assert other.pretrained and not any(p.requires_grad for p in other.parameters())
        torch.testing.assert_close(other(x, y), want, msg=name)


def test_bad_weights_are_clear_errors(tmp_path, net: ResNetPerceptual) -> None:
    torch.save(net.net.state_dict(), tmp_path / "hf.pt")
    net.net.save_pretrained(str(tmp_path / "folder"))
    with pytest.raises(FileNotFoundError, match="ResNet weight file not found"):
        ResNetPerceptual(str(tmp_path / "none.pth"), size="debug")
    with pytest.raises(RuntimeError, match="do not fit ResNet-50"):  # a debug state dict is no ResNet-50
        ResNetPerceptual(str(tmp_path / "hf.pt"), size="50")
    with pytest.raises(ValueError, match="not a ResNet-50 classifier"):
        ResNetPerceptual(str(tmp_path / "folder"), size="50")
    torch.save({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}, tmp_path / "tv.pth")
    with pytest.raises(ValueError, match="torchvision's layout"):
        ResNetPerceptual(str(tmp_path / "tv.pth"), size="debug")
