"""State-dict adapter for LlamaGen's public VQ tokenizers (VQ-16, also VQ-8).

Their checkpoint is ``{"model": state_dict}`` saved with torch.save; keys match
``system.models.vqgan.VQModel`` except the training-only usage ring buffer
``quantize.codebook_used`` (dropped on load, zeros on export). The config
(codebook size/dim, ch, ch_mult, z_channels, res blocks) is read off the
tensor shapes, so VQ-8 and small test models load too.

`VQFrozen` is the frozen tokenizer adapter (kind "llamagen-vq") of a VQModel.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Optional

import torch
from torch import Tensor

from system.models import weights
from system.models.artifacts import FrozenTokenizer, config_from_dict
from system.models.vqgan import VQGANConfig, VQModel

USAGE_BUFFER_KEY = "quantize.codebook_used"
USAGE_BUFFER_LEN = 65536
_WRAPPER_KEYS = ("model", "state_dict", "ema", "module")


def _read(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"LlamaGen VQ checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap(obj: dict[str, Any]) -> dict[str, Tensor]:
    """Strip {"model": ...}-style wrappers and DDP "module." prefixes."""
    while isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
        key = next((k for k in _WRAPPER_KEYS if k in obj), None)
        if key is None:
            raise ValueError(f"cannot find a state dict in checkpoint with keys {sorted(obj)[:8]}; expected one of {_WRAPPER_KEYS}")
        obj = obj[key]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def infer_config(sd: dict[str, Tensor]) -> VQGANConfig:
    """Read a VQGANConfig off the tensor shapes of a LlamaGen-layout state dict."""
    try:
        k, d = sd["quantize.embedding.weight"].shape
        ch = sd["encoder.conv_in.weight"].shape[0]
        z_channels = sd["encoder.conv_out.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a LlamaGen VQ state dict: missing {e}") from None
    levels = sorted({int(m.group(1)) for key in sd if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", key))})
    ch_mult = tuple(sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(len(levels)))
    n_res = len({key.split(".")[4] for key in sd if key.startswith("encoder.conv_blocks.0.res.")})
    return VQGANConfig(codebook_size=k, codebook_dim=d, ch=ch, ch_mult=ch_mult, z_channels=z_channels, num_res_blocks=n_res)


def load_llamagen_vq(path_or_state_dict: str | os.PathLike | dict[str, Any], config: VQGANConfig | None = None) -> VQModel:
    """LlamaGen VQ checkpoint (path, or loaded dict) -> VQModel with strict=True loading, eval mode.
    In plan mode (system/models/weights.py) a path is not read: `config`, else VQ-16's (VQ-8's for a
    vq_ds8 file), with placeholder weights."""
    if not isinstance(path_or_state_dict, dict) and not weights.need("LlamaGen VQ", os.fspath(path_or_state_dict)):
        ds8 = "ds8" in os.path.basename(os.fspath(path_or_state_dict))
        return VQModel(config or VQGANConfig(ch_mult=(1, 2, 2, 4) if ds8 else (1, 1, 2, 2, 4))).eval()
    raw = path_or_state_dict if isinstance(path_or_state_dict, dict) else _read(path_or_state_dict)
    sd = dict(_unwrap(raw))
    sd.pop(USAGE_BUFFER_KEY, None)
    model = VQModel(config or infer_config(sd))
    model.load_state_dict(sd, strict=True)
    return model.eval()


def to_llamagen_state_dict(model: VQModel) -> dict[str, Tensor]:
    """Our VQModel -> LlamaGen's key layout (adds the zero usage buffer they carry)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd[USAGE_BUFFER_KEY] = torch.zeros(USAGE_BUFFER_LEN)
    return sd


class VQFrozen(FrozenTokenizer):
    """LlamaGen's VQ (kind "llamagen-vq"): a 2D grid of codes in raster order; the GPT embeds ids
    with its own table (no codebook)."""

    kind = "llamagen-vq"
    wraps = VQModel
    model: VQModel

    @classmethod
    def from_export(cls, config: dict, state_dict: Optional[dict[str, Tensor]]) -> "VQFrozen":
        cfg = config_from_dict(VQGANConfig, config, "llamagen-vq")
        return cls(load_llamagen_vq(state_dict, cfg) if state_dict is not None else VQModel(cfg).eval())

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.codebook_size

    @property
    def image_size(self) -> None:
        return None

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        return self.model.encode(images).flatten(1)  # (B, h*w)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        return self.model.decode_codes(codes)  # (B, 3, h*f, w*f)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        return self.model(images)[0]

    def num_tokens(self, resolution: int) -> int:
        f = self.model.cfg.downsample
        if resolution % f:
            raise ValueError(f"data.resolution={resolution} is not a multiple of the VQ's downsampling factor {f}")
        return (resolution // f) ** 2

    def image_size_for(self, num_tokens: int) -> int:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"the VQ gives a square grid of codes; {num_tokens} codes is not a square")
        return side * self.model.cfg.downsample
