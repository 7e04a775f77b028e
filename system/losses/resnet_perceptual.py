"""The ResNet-50 logit term of SemTok's stage II perceptual loss, written from its definition.

SemTok stage II (../shared/seeds/semtok.txt) trains with L_per = LPIPS + ResNet loss, the ResNet
loss being the logit-based perceptual term of MaskBit (Weber et al. 2024):

    R = mean over (B, 1000) of (logits(pred) - logits(target))^2

with ``logits`` the ImageNet-1k classification logits of a ResNet-50 on the images in [0, 1],
resized to 224 x 224 (bilinear, antialiased, align_corners False) and normalised with the ImageNet
mean/std: the same computation as AliTok's ConvNeXt term, shared through ``LogitPerceptual``
(system/losses/convnext_perceptual.py). ``ResNetPerceptual`` computes R; the method multiplies it
by its own weight (``method.resnet``).

The network is transformers' ``ResNetForImageClassification`` (ResNet-50: bottleneck blocks,
depths 3-4-6-3, 25.6M parameters). Weights come from a local path in transformers' layout:
- a folder written by ``save_pretrained`` (e.g. a copy of microsoft/resnet-50);
- a .pt/.pth/.safetensors state dict with transformers' keys (``resnet.*``, ``classifier.1.*``).
torchvision's ``resnet50`` state dicts (``conv1.*``, ``layer1.*``, ``fc.*``) are NOT converted: they
are refused with an error; convert them to transformers' layout first (or use microsoft/resnet-50).
Without a path the network is random (``self.pretrained is False``) and a warning is raised: fine
for tests, meaningless as a perceptual loss. The network is frozen (eval, no parameter requires
grad); gradients flow to the prediction.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

from torch import nn

from system.losses.convnext_perceptual import LogitPerceptual, classifier_from_folder
from system.losses.lpips import load_state_dict_file
from system.models import weights

# size -> (depths, hidden_sizes, embedding_size, num_labels); "debug" is a tiny random net for tests
RESNET_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...], int, int]] = {
    "50": ((3, 4, 6, 3), (256, 512, 1024, 2048), 64, 1000),
    "debug": ((1, 1, 1, 1), (8, 16, 32, 64), 8, 16),
}
_TORCHVISION_PREFIXES = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.", "fc.")


def resnet_config(size: str):
    """transformers' ResNetConfig of a `RESNET_SIZES` entry (bottleneck blocks, ReLU, stride in the
    3x3 conv as torchvision's ResNet-50 v1.5 / microsoft/resnet-50)."""
    from transformers import ResNetConfig

    if size not in RESNET_SIZES:
        raise ValueError(f"ResNet size {size!r}; expected one of {sorted(RESNET_SIZES)}")
    depths, hidden, embedding, labels = RESNET_SIZES[size]
    return ResNetConfig(depths=list(depths), hidden_sizes=list(hidden), embedding_size=embedding, num_labels=labels,
                        layer_type="bottleneck", hidden_act="relu", downsample_in_first_stage=False)


_SHAPE_FIELDS = ("depths", "hidden_sizes", "embedding_size", "layer_type", "num_labels")


def build_resnet(weights_path: Optional[str], size: str = "50") -> nn.Module:
    """ResNetForImageClassification of `size`, with the weights at `weights_path` (module doc) or
    random ones (None)."""
    from transformers import ResNetForImageClassification

    cfg = resnet_config(size)
    if weights_path is None or not weights.need(f"ResNet-{size} weights", weights_path):  # plan mode: not read
        return ResNetForImageClassification(cfg)
    path = Path(weights_path)
    if path.is_dir():
        return classifier_from_folder(ResNetForImageClassification, path, cfg, _SHAPE_FIELDS, f"ResNet-{size}")
    sd = load_state_dict_file(path, what="ResNet")
    if any(k.startswith(_TORCHVISION_PREFIXES) for k in sd):
        raise ValueError(f"ResNet weights {path}: torchvision's layout (conv1.*, layer1.*, fc.*) is not converted; "
                         "pass transformers' layout (a save_pretrained folder of microsoft/resnet-50, or its state dict)")
    model = ResNetForImageClassification(cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]  # BN counters: unused in eval
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise RuntimeError(f"ResNet weights {path} do not fit ResNet-{size}: missing {missing[:3]} ({len(missing)}), "
                           f"unexpected {unexpected[:3]} ({len(unexpected)}), mismatched shapes {mismatched[:3]} "
                           f"({len(mismatched)})")
    model.load_state_dict(sd, strict=False)
    return model


class ResNetPerceptual(LogitPerceptual):
    """Frozen ResNet logit distance (module doc; the computation is ``LogitPerceptual``'s).
    ``forward(pred, target)`` takes two (B,3,H,W) images in [-1, 1] and returns a scalar."""

    def __init__(self, weights_path: Optional[str] = None, size: str = "50", image_size: int = 224) -> None:
        super().__init__(build_resnet(weights_path, size), pretrained=weights_path is not None, image_size=image_size)
        if not self.pretrained:
            warnings.warn(f"ResNet-{size} perceptual loss built with RANDOM weights: values are not a perceptual "
                          "loss. Pass a local path to ImageNet weights in transformers' layout (a save_pretrained "
                          "folder of microsoft/resnet-50 or its state dict).", stacklevel=2)
