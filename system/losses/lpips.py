"""LPIPS (v0.1, VGG16 backbone) written from the paper's definition.

Key layouts match the public weight files so real weights load with strict=True:
- VGG16 trunk: torchvision's ``vgg16-397923af.pth`` keys ``features.N.weight/bias``
  (conv indices 0,2,5,7,10,12,14,17,19,21,24,26,28); ``classifier.*`` keys are ignored.
- Linear heads: the lpips package's ``weights/v0.1/vgg.pth`` keys ``lin{i}.model.1.weight``
  with shapes (1, C, 1, 1).
In plan mode (system/models/weights.py) the paths are recorded, not read. Without weight paths the
network is random (``self.pretrained is False``) and a warning is
raised: fine for tests, meaningless as a perceptual metric.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from system.models import weights

# VGG16 "D" configuration up to relu5_3; "M" = 2x2 max-pool.
_VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# Index (in ``features``) of the ReLU after which each tap is read: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_TAP_INDICES = (3, 8, 15, 22, 29)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# ScalingLayer constants of LPIPS v0.1 (inputs in [-1, 1]).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def load_state_dict_file(path: str | Path, what: str = "LPIPS") -> dict[str, torch.Tensor]:
    """A state dict from a local .pth/.pt (a bare one or under "state_dict") or .safetensors file;
    `what` names the network in the error for a missing file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weight file not found: {path} (expected a local .pth/.safetensors file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


class VGG16Features(nn.Module):
    """torchvision-compatible VGG16 ``features`` trunk (layers 0..29) returning the 5 LPIPS taps."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                c_in = int(v)
        self.features = nn.Sequential(*layers)
        for m in self.features:
            if isinstance(m, nn.Conv2d):  # torchvision's VGG init, so random features are not degenerate
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # (B,3,H,W) -> 5 x (B,C_i,H_i,W_i)
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAP_INDICES:
                taps.append(x)
        return taps


class NetLinLayer(nn.Module):
    """1x1 conv head without bias; index 1 of ``model`` so keys read ``model.1.weight``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))
        # Random-init stand-in: a non-negative average (LPIPS heads are non-negative by construction).
        nn.init.constant_(self.model[1].weight, 1.0 / channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,C,H,W) -> (B,1,H,W)
        return self.model(x)


class LPIPSHeads(nn.Module):
    """Container whose state dict is exactly the lpips ``vgg.pth`` layout (``lin0..lin4``)."""

    def __init__(self) -> None:
        super().__init__()
        for i, c in enumerate(TAP_CHANNELS):
            self.add_module(f"lin{i}", NetLinLayer(c))

    def __getitem__(self, i: int) -> NetLinLayer:
        return getattr(self, f"lin{i}")


def _unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # x / ||x||_channels; eps inside the sqrt keeps the gradient finite at all-zero positions.
    return x * torch.rsqrt(x.pow(2).sum(dim=1, keepdim=True) + eps * eps)


class LPIPS(nn.Module):
    """Frozen LPIPS distance. ``forward(x, y)`` takes images in [-1, 1], returns (B,) distances.

    Parameters never require grad and the module stays in eval mode, but gradients flow
    to the inputs, so it can be used as a loss.
    """

    def __init__(self, vgg_weights: str | None = None, lin_weights: str | None = None) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        self.heads = LPIPSHeads()
        if vgg_weights is not None and weights.need("LPIPS VGG16 trunk", str(vgg_weights)):
            self.load_vgg(vgg_weights)
        if lin_weights is not None and weights.need("LPIPS v0.1 linear heads", str(lin_weights)):
            self.load_heads(lin_weights)
        self.pretrained: bool = vgg_weights is not None and lin_weights is not None
        if not self.pretrained:
            missing = [n for n, p in (("vgg_weights", vgg_weights), ("lin_weights", lin_weights)) if p is None]
            warnings.warn(
                f"LPIPS built with RANDOM weights (missing {', '.join(missing)}): values are not a perceptual "
                "metric. Pass local paths to torchvision's vgg16-397923af.pth and lpips' v0.1 vgg.pth.",
                stacklevel=2,
            )
        self.requires_grad_(False)
        self.eval()

    def load_vgg(self, path: str | Path) -> None:
        """Load torchvision VGG16 weights (``features.*`` keys; ``classifier.*`` ignored)."""
        sd = load_state_dict_file(path)
        feats = {k: v for k, v in sd.items() if k.startswith("features.")}
        if not feats:
            raise KeyError(f"{path}: no 'features.*' keys; expected a torchvision vgg16 state dict")
        self.net.load_state_dict(feats, strict=True)

    def load_heads(self, path: str | Path) -> None:
        """Load LPIPS v0.1 linear heads (``lin{i}.model.1.weight``, shapes (1,C,1,1))."""
        sd = load_state_dict_file(path)
        self.heads.load_state_dict({k: v for k, v in sd.items() if k.startswith("lin")}, strict=True)

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always eval: frozen metric

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (B,3,H,W) x2 -> (B,)
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two (B,3,H,W) images in [-1,1]; got {tuple(x.shape)} and {tuple(y.shape)}")
        b = x.shape[0]
        dtype = self.shift.dtype
        both = torch.cat([x, y], dim=0).to(dtype)  # one trunk pass for both images
        feats = self.net((both - self.shift) / self.scale)
        dist = torch.zeros(b, device=x.device, dtype=torch.float32)
        for i, f in enumerate(feats):
            f = f.float()
            diff = (_unit_normalize(f[:b]) - _unit_normalize(f[b:])).pow(2)
            dist = dist + self.heads[i](diff.to(self.heads[i].model[1].weight.dtype)).float().mean(dim=(1, 2, 3))
        return dist
