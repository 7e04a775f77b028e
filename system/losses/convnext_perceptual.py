"""The ConvNeXt-S term of the official AliTok / TiTok / RAR perceptual loss, written from its definition.

The official code (bytedance/1d-tokenizer ``modeling/modules/perceptual_loss.py``, which AliTok's
code derives from) builds ``PerceptualLoss("lpips-convnext_s-1.0-0.1")`` and weights it by
``perceptual_weight`` 1.1: ``1.1 * (1.0 * LPIPS + 0.1 * C) / (1.0 + 0.1) = LPIPS + 0.1 * C``, where

    C = mean over (B, 1000) of (logits(pred) - logits(target))^2

with ``logits`` the ImageNet-1k classification logits of torchvision's ConvNeXt-Small
(IMAGENET1K_V1) on the images in [0, 1], resized to 224 x 224 (bilinear, antialiased,
align_corners False) and normalised with the ImageNet mean/std. ``ConvNeXtPerceptual`` computes
C; the method multiplies it by its own weight (``method.convnext``, official 0.1).

The network is transformers' ``ConvNextForImageClassification`` (torchvision does not import on
every machine we use). Weights come from a local path:
- a folder written by ``save_pretrained`` (e.g. a copy of facebook/convnext-small-224);
- a .pt/.pth/.safetensors state dict in transformers' layout (``convnext.*``, ``classifier.*``);
- torchvision's ``convnext_small-0c510722.pth`` (``features.*``, ``classifier.*``: the official
  weights), converted key by key (the two implementations compute the same function).
Without a path the network is random (``self.pretrained is False``) and a warning is raised: fine
for tests, meaningless as a perceptual loss. The network is frozen (eval, no parameter requires
grad); gradients flow to the prediction.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from system.losses.lpips import load_state_dict_file
from system.models import weights

# size -> (depths, hidden_sizes, num_labels); "debug" is a tiny random net for tests
CONVNEXT_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]] = {
    "small": ((3, 3, 27, 3), (96, 192, 384, 768), 1000),
    "debug": ((1, 1, 1, 1), (8, 16, 32, 64), 16),
}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def convnext_config(size: str):
    """transformers' ConvNextConfig of a `CONVNEXT_SIZES` entry (final LayerNorm eps 1e-6, as
    torchvision's classifier norm)."""
    from transformers import ConvNextConfig

    if size not in CONVNEXT_SIZES:
        raise ValueError(f"ConvNeXt size {size!r}; expected one of {sorted(CONVNEXT_SIZES)}")
    depths, hidden, labels = CONVNEXT_SIZES[size]
    return ConvNextConfig(depths=list(depths), hidden_sizes=list(hidden), num_labels=labels, layer_norm_eps=1e-6)


def torchvision_to_transformers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision ConvNeXt keys -> transformers' ConvNextForImageClassification keys.

    torchvision: features.0 = stem (conv, LayerNorm2d); features.{1,3,5,7} = stages 0..3 of
    CNBlocks (block.0 dwconv, block.2 LayerNorm, block.3 / block.5 Linear, layer_scale (C,1,1));
    features.{2,4,6} = downsampling (LayerNorm2d, conv) before stages 1..3; classifier.0 the final
    LayerNorm2d, classifier.2 the Linear head."""
    block = {"0": "dwconv", "2": "layernorm", "3": "pwconv1", "5": "pwconv2"}
    out = {}
    for key, v in sd.items():
        parts = key.split(".")
        if parts[0] == "classifier":
            out[{"0": "convnext.layernorm", "2": "classifier"}[parts[1]] + "." + parts[-1]] = v
            continue
        if parts[0] != "features":
            raise KeyError(f"unexpected torchvision ConvNeXt key {key!r}")
        i = int(parts[1])
        if i == 0:  # stem
            out[f"convnext.embeddings.{('patch_embeddings', 'layernorm')[int(parts[2])]}.{parts[-1]}"] = v
        elif i % 2 == 0:  # downsampling before stage i // 2
            out[f"convnext.encoder.stages.{i // 2}.downsampling_layer.{parts[2]}.{parts[-1]}"] = v
        else:
            layer = f"convnext.encoder.stages.{i // 2}.layers.{parts[2]}"
            if parts[3] == "layer_scale":  # (C, 1, 1) -> (C,)
                out[f"{layer}.layer_scale_parameter"] = v.reshape(-1)
            else:
                out[f"{layer}.{block[parts[4]]}.{parts[-1]}"] = v
    return out


def classifier_from_folder(cls: type, path: Path, cfg, fields: tuple[str, ...], what: str) -> nn.Module:
    """A transformers image classifier `cls` from a save_pretrained folder, float32; ValueError unless
    its config's `fields` equal `cfg`'s and no weight is missing or mismatched."""
    model, info = cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    bad = list(info.get("missing_keys", [])) + list(info.get("mismatched_keys", []))

    def shape(c) -> tuple:
        return tuple(list(v) if isinstance(v, (list, tuple)) else v for v in (getattr(c, f) for f in fields))

    if bad or shape(model.config) != shape(cfg):
        raise ValueError(f"{what.split('-')[0]} weights {path}: not a {what} classifier ({', '.join(fields)} = "
                         f"{shape(model.config)}; missing/mismatched keys {bad[:5]})")
    return model.float()


def build_convnext(weights_path: Optional[str], size: str = "small") -> nn.Module:
    """ConvNextForImageClassification of `size`, with the weights at `weights_path` (module doc)
    or random ones (None)."""
    from transformers import ConvNextForImageClassification

    cfg = convnext_config(size)
    if weights.planning_now():  # plan mode: not read; transformers' ConvNeXt turns a torch.linspace into
        if weights_path is not None:  # Python floats, which a fake tensor cannot give: build it real
            weights.need(f"ConvNeXt-{size} weights", weights_path)
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            return ConvNextForImageClassification(cfg)
    if weights_path is None:
        return ConvNextForImageClassification(cfg)
    path = Path(weights_path)
    if path.is_dir():
        return classifier_from_folder(ConvNextForImageClassification, path, cfg, ("depths", "hidden_sizes", "num_labels"),
                                      f"ConvNeXt-{size}")
    sd = load_state_dict_file(path, what="ConvNeXt")
    if any(k.startswith("features.") for k in sd):
        sd = torchvision_to_transformers(sd)
    model = ConvNextForImageClassification(cfg)
    model.load_state_dict(sd, strict=True)
    return model


class LogitPerceptual(nn.Module):
    """A frozen ImageNet classifier's logit distance, shared by ``ConvNeXtPerceptual`` and
    ``ResNetPerceptual`` (system/losses/resnet_perceptual.py): ``forward(pred, target)`` takes two
    (B,3,H,W) images in [-1, 1], maps them to [0, 1], resizes them to ``image_size`` (bilinear,
    antialiased, align_corners False), normalises them with the ImageNet mean/std and returns the
    scalar mean over (B, classes) of (logits(pred) - logits(target))^2. The target's logits are
    computed without a graph; gradients flow to the prediction only. ``net`` maps
    ``pixel_values`` to an output with ``.logits`` (a transformers image classifier)."""

    def __init__(self, net: nn.Module, pretrained: bool, image_size: int = 224) -> None:
        super().__init__()
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.net = net
        self.pretrained: bool = pretrained
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LogitPerceptual":
        return super().train(False)  # always eval: frozen loss network

    def logits(self, images: Tensor) -> Tensor:  # (B,3,H,W) in [-1,1] -> (B, num_labels) float32
        x = (images.float() + 1.0) / 2.0  # the official code's [0, 1] inputs
        s = self.image_size
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        dtype = next(self.net.parameters()).dtype
        return self.net(pixel_values=x.to(dtype)).logits.float()

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:  # (B,3,H,W) x2 -> ()
        if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} expects two (B,3,H,W) images in [-1,1]; got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")
        with torch.no_grad():  # the target is data: no graph (half the activation memory)
            ref = self.logits(target)
        return F.mse_loss(self.logits(pred), ref)


class ConvNeXtPerceptual(LogitPerceptual):
    """Frozen ConvNeXt logit distance (module doc; the computation is ``LogitPerceptual``'s)."""

    def __init__(self, weights_path: Optional[str] = None, size: str = "small", image_size: int = 224) -> None:
        super().__init__(build_convnext(weights_path, size), pretrained=weights_path is not None,
                         image_size=image_size)
        if not self.pretrained:
            warnings.warn(f"ConvNeXt-{size} perceptual loss built with RANDOM weights: values are not a perceptual "
                          "loss. Pass a local path to ImageNet weights (torchvision's convnext_small-0c510722.pth "
                          "or a save_pretrained folder of facebook/convnext-small-224).", stacklevel=2)
