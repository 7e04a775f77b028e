"""ConvNeXt perceptual term (tiny random net): the official formula, gradients to the prediction
only, weight files in transformers' and torchvision's layouts, and the missing-weights error."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from system.config import AliTokStage1Config, ConvNeXtNetConfig  # noqa: E402
from system.losses.convnext_perceptual import ConvNeXtPerceptual, torchvision_to_transformers  # noqa: E402
from system.methods.alitok import check_stage1  # noqa: E402
from system.methods.base import DataSpec  # noqa: E402


@pytest.fixture(scope="module")
def net() -> ConvNeXtPerceptual:
    """The tiny random net (size "debug")."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM"):
        return ConvNeXtPerceptual(None, size="debug")


def _imgs(seed: int) -> torch.Tensor:  # (2, 3, 32, 32) in [-1, 1]
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_zero_for_identical_positive_otherwise(net: ConvNeXtPerceptual) -> None:
    x = _imgs(1)
    d = net(x, x)
    assert d.shape == () and float(d) == 0.0
    assert float(net(x, _imgs(2))) > 0


def test_matches_the_official_formula(net: ConvNeXtPerceptual) -> None:
    """MSE of the logits of the [0, 1] images resized to 224 (bilinear, antialiased) and ImageNet-normalised."""
    x, y = _imgs(3), _imgs(4)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def logits(im):
        im = F.interpolate((im + 1) / 2, size=224, mode="bilinear", align_corners=False, antialias=True)
        return net.net(pixel_values=(im - mean) / std).logits

    torch.testing.assert_close(net(x, y), F.mse_loss(logits(x), logits(y)))


def test_gradient_reaches_pred_not_the_network(net: ConvNeXtPerceptual) -> None:
    x = _imgs(5).requires_grad_(True)
    net(x, _imgs(6)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert all(not p.requires_grad and p.grad is None for p in net.parameters())
    net.train()
    assert not net.training and not net.net.training


def test_loads_saved_weights_in_every_layout(tmp_path, net: ConvNeXtPerceptual) -> None:
    from safetensors.torch import save_file

    x, y = _imgs(7), _imgs(8)
    want = net(x, y)
    sd = net.net.state_dict()
    torch.save(sd, tmp_path / "hf.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "hf.safetensors"))
    net.net.save_pretrained(str(tmp_path / "folder"))
    names = _torchvision_names(sd)  # torchvision's layout (torchvision/models/convnext.py)
    tv = {names[k]: (v.view(-1, 1, 1) if k.endswith("layer_scale_parameter") else v) for k, v in sd.items()}
    assert all(k.startswith(("features.", "classifier.")) for k in tv)
    torch.save(tv, tmp_path / "tv.pth")
    torch.testing.assert_close(torchvision_to_transformers(tv), sd)
    for name in ("hf.pt", "hf.safetensors", "folder", "tv.pth"):
        other = ConvNeXtPerceptual(str(tmp_path / name), size="debug")
        assert other.pretrained
        torch.testing.assert_close(other(x, y), want, msg=name)
    with pytest.raises(FileNotFoundError, match="ConvNeXt weight file not found"):
        ConvNeXtPerceptual(str(tmp_path / "none.pth"), size="debug")
    with pytest.raises(RuntimeError):  # a debug state dict is no ConvNeXt-S
        ConvNeXtPerceptual(str(tmp_path / "hf.pt"), size="small")


def _torchvision_names(sd: dict) -> dict[str, str]:
    """transformers key -> torchvision key for the debug net (depth 1 per stage)."""
    out = {}
    for k in sd:
        p = k.split(".")
        if k.startswith("classifier."):
            out[k] = "classifier.2." + p[-1]
        elif k.startswith("convnext.layernorm."):
            out[k] = "classifier.0." + p[-1]
        elif k.startswith("convnext.embeddings."):
            out[k] = f"features.0.{0 if p[2] == 'patch_embeddings' else 1}.{p[-1]}"
        elif p[4] == "downsampling_layer":
            out[k] = f"features.{2 * int(p[3])}.{p[5]}.{p[-1]}"
        elif p[-1] == "layer_scale_parameter":
            out[k] = f"features.{2 * int(p[3]) + 1}.{p[5]}.layer_scale"
        else:
            idx = {"dwconv": 0, "layernorm": 2, "pwconv1": 3, "pwconv2": 5}[p[6]]
            out[k] = f"features.{2 * int(p[3]) + 1}.{p[5]}.block.{idx}.{p[-1]}"
    return out


def test_weight_without_a_path_is_a_clear_error() -> None:
    data = DataSpec(resolution=32, num_classes=3)
    cfg = AliTokStage1Config(tokenizer="debug-tiny-causal", lpips=0.0, convnext=0.1)
    with pytest.raises(ValueError, match=r"method\.convnext_net\.path.*method\.convnext=0"):
        check_stage1(cfg, data)
    with pytest.raises(ValueError, match=r"method\.convnext_net\.path"):  # the default (official recipe): on
        check_stage1(AliTokStage1Config(tokenizer="debug-tiny-causal", lpips=0.0), data)
    check_stage1(AliTokStage1Config(tokenizer="debug-tiny-causal", lpips=0.0, convnext=0.0), data)  # off: no weights
    check_stage1(AliTokStage1Config(tokenizer="debug-tiny-causal", lpips=0.0, convnext=0.1,
                                    convnext_net=ConvNeXtNetConfig(random_init=True)), data)
