"""The frozen SD3.5 VAE of SemTok (diffusers' ``AutoencoderKL``) as a latent encoder / decoder.

SemTok tokenizes the latents of Stable Diffusion 3.5's VAE (../shared/seeds/semtok.txt): an image
(B,3,H,W) in [-1, 1] maps to latents (B,16,H/8,W/8) and back. ``LatentVAE`` wraps an
``AutoencoderKL`` and applies the checkpoint's latent normalisation exactly as the SD3 pipelines do:

    encode: z = (posterior mean (or a sample) - shift_factor) * scaling_factor
    decode: x = vae.decode(z / scaling_factor + shift_factor).sample   (about [-1, 1], not clamped)

The VAE is frozen (always eval, no parameter requires grad). ``encode`` runs under no_grad;
``decode`` does not, so pixel losses backpropagate through the frozen decoder into the latents
(SemTok stage II). Both compute in the module's dtype and return float32.

Weights (``LatentVAEConfig``, system/config/methods.py): a run's export (part ``vae``: its
model.json config is ``config_dict()``, its weights the AutoencoderKL state dict), a local folder
(an ``AutoencoderKL.save_pretrained`` folder or a diffusers pipeline folder with ``vae/``), a hub
name (subfolder ``vae``; needs internet), or random init (tests; ``tiny`` for a small net with the
same structure: 16 latent channels, f = 8). No
pretrained SD3.5 weights are available offline, so the CPU demo trains a tiny VAE itself
(``new_autoencoder``) and wraps it (``LatentVAE(autoencoder, scaling_factor=..., shift_factor=...)``).
A run exports ``config_dict()`` plus the state dict; ``LatentVAE.from_config_dict`` rebuilds it
(``build_latent_vae`` does so for ``LatentVAEConfig.export``). In plan mode (system/models/weights.py)
no weights are read: ``planned_autoencoder`` builds the architecture from the config alone.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from system.config.methods import LatentVAEConfig  # noqa: F401 (re-exported)
from system.models import weights
from system.models.optional import require
from system.models.artifacts import load_part, model_part

# stabilityai/stable-diffusion-3.5-{medium,large} vae/config.json (AutoencoderKL); 83,819,683 parameters
SD35_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
    "mid_block_add_attention": True,
}

# the same structure (4 blocks -> 3 downsamplings, f = 8; 16 latent channels; mid-block attention) at a
# CPU-friendly width; factors 1 / 0 so a freshly trained tiny VAE is not mis-scaled (set measured ones)
TINY_VAE_CONFIG: dict[str, Any] = {
    **SD35_VAE_CONFIG,
    "block_out_channels": [16, 32, 64, 64],  # the full-resolution stage at 16 channels: 2.3x faster than 32 on a CPU
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
}


def new_autoencoder(tiny: bool = True, **overrides: Any):
    """A fresh (randomly initialised, trainable) ``AutoencoderKL`` of ``TINY_VAE_CONFIG`` (tiny) or
    ``SD35_VAE_CONFIG``; `overrides` replace single config fields."""
    AutoencoderKL = require("diffusers").AutoencoderKL

    cfg = copy.deepcopy(TINY_VAE_CONFIG if tiny else SD35_VAE_CONFIG)
    cfg.update(overrides)
    return AutoencoderKL(**cfg)


def _resolve_local(path: Path) -> tuple[str, Optional[str]]:
    """(folder, subfolder) of an AutoencoderKL inside `path` (itself or its vae/)."""
    if (path / "vae" / "config.json").is_file():
        return str(path), "vae"
    if (path / "config.json").is_file():
        return str(path), None
    raise ValueError(f"LatentVAEConfig.path={str(path)!r}: no AutoencoderKL there (expected config.json, from "
                     "AutoencoderKL.save_pretrained, or a diffusers pipeline folder with vae/config.json)")


def autoencoder_config_dict(vae: Any, scaling_factor: float, shift_factor: float) -> dict[str, Any]:
    """An AutoencoderKL's config as a plain JSON-able dict (no private ``_*`` keys) with these factors."""
    d = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    d["scaling_factor"], d["shift_factor"] = float(scaling_factor), float(shift_factor)
    return json.loads(json.dumps(d))  # tuples -> lists, FrozenDict -> dict


def autoencoder_from_config_dict(d: dict[str, Any], state_dict: Optional[dict[str, Tensor]] = None):
    """``AutoencoderKL(**d)`` (private ``_*`` keys dropped) with `state_dict` loaded strictly (its keys
    the AutoencoderKL's, or a ``LatentVAE``'s ``vae.*``); no state dict: random weights."""
    AutoencoderKL = require("diffusers").AutoencoderKL

    vae = AutoencoderKL(**{k: v for k, v in d.items() if not k.startswith("_")})
    if state_dict is not None:
        if state_dict and all(k.startswith("vae.") for k in state_dict):
            state_dict = {k[len("vae."):]: v for k, v in state_dict.items()}
        vae.load_state_dict(state_dict, strict=True)
    return vae


def build_autoencoder(cfg: LatentVAEConfig, storage: Any = None):
    """The underlying diffusers ``AutoencoderKL`` of `cfg` (not yet frozen), float32. `storage`: the
    StorageConfig an s3:// export is read with."""
    AutoencoderKL = require("diffusers").AutoencoderKL

    export = getattr(cfg, "export", None)
    sources = {k: v for k, v in (("export", export), ("path", cfg.path), ("hub_name", cfg.hub_name)) if v is not None}
    if len(sources) > 1:
        raise ValueError(f"LatentVAEConfig: {' and '.join(sources)} are set together; set exactly one weight source")
    if sources and cfg.random_init:
        raise ValueError(f"LatentVAEConfig: random_init=True conflicts with {next(iter(sources))}; set one or the other")
    if not sources and not cfg.random_init:
        raise ValueError("LatentVAEConfig has no weights: set export (a latent_vae run's export/ folder), path (a local "
                         "AutoencoderKL save_pretrained folder or a diffusers pipeline folder with vae/), hub_name "
                         "(e.g. stabilityai/stable-diffusion-3.5-medium; needs internet), or random_init=True (tests only)")
    if cfg.tiny and not cfg.random_init:
        raise ValueError("LatentVAEConfig: tiny=True only applies with random_init=True")
    if cfg.random_init:
        return new_autoencoder(tiny=cfg.tiny)
    kind, where = next(iter(sources.items()))
    if not weights.need("VAE" + (" export" if kind == "export" else ""), where, hub=kind == "hub_name"):
        return planned_autoencoder(cfg, storage)
    if export is not None:
        return autoencoder_from_config_dict(model_part(export, "vae", storage)["config"],
                                            load_part(export, "vae", storage, ema=True)).float()
    if cfg.path is not None:
        path = Path(cfg.path)
        if not path.is_dir():
            raise FileNotFoundError(f"LatentVAEConfig.path={cfg.path!r} is not a local folder")
        folder, subfolder = _resolve_local(path)
        local = True
    else:
        folder, subfolder, local = cfg.hub_name, "vae", False
    model, info = AutoencoderKL.from_pretrained(folder, subfolder=subfolder, local_files_only=local,
                                                low_cpu_mem_usage=False, output_loading_info=True)
    bad = list(info.get("missing_keys", [])) + list(info.get("mismatched_keys", []))
    if bad:
        source = cfg.path or cfg.hub_name
        raise ValueError(f"VAE checkpoint {source!r} lacks weights for AutoencoderKL: {bad[:5]} ({len(bad)} in all)")
    return model.float()


def planned_autoencoder(cfg: LatentVAEConfig, storage: Any = None):
    """Plan mode (system/models/weights.py): the AutoencoderKL of `cfg` without its weights, from the
    export's model.json, the local folder's config.json, or (a hub name, a folder not there) SD3.5's."""
    from diffusers import AutoencoderKL

    export = getattr(cfg, "export", None)
    if export is not None:
        from system.models.artifacts import model_part

        return autoencoder_from_config_dict(model_part(export, "vae", storage)["config"])
    if cfg.path is not None and Path(cfg.path).is_dir():
        folder, subfolder = _resolve_local(Path(cfg.path))
        return AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder=subfolder))
    if cfg.hub_name is not None and "stable-diffusion-3" not in cfg.hub_name:
        raise ValueError(f"LatentVAEConfig.hub_name={cfg.hub_name!r}: no built-in architecture to plan with (SD3.x's "
                         "only); give a local path with its config.json")
    return autoencoder_from_config_dict(SD35_VAE_CONFIG)


class LatentVAE(nn.Module):
    """Frozen AutoencoderKL: ``encode`` (B,3,H,W) in [-1,1] -> (B,C,H/f,W/f) normalised latents,
    ``decode`` back (module doc). Wrapping freezes the given ``AutoencoderKL`` in place; the factors
    default to the autoencoder's config (shift None -> 0)."""

    def __init__(self, vae: nn.Module, scaling_factor: Optional[float] = None, shift_factor: Optional[float] = None,
                 sample: bool = False) -> None:
        super().__init__()
        self.vae = vae
        scale = vae.config.scaling_factor if scaling_factor is None else scaling_factor
        shift = getattr(vae.config, "shift_factor", None) if shift_factor is None else shift_factor
        self._scaling_factor = float(scale)
        self._shift_factor = float(shift or 0.0)
        if not self._scaling_factor > 0:
            raise ValueError(f"LatentVAE scaling_factor must be > 0; got {self._scaling_factor}")
        self.sample = bool(sample)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_config_dict(cls, d: dict[str, Any], state_dict: Optional[dict[str, Tensor]] = None,
                         sample: bool = False) -> "LatentVAE":
        """Rebuild from ``config_dict()`` output (factors included) and the AutoencoderKL state dict
        (``autoencoder_from_config_dict``); no state dict: random weights (e.g. meta-device checks)."""
        vae = autoencoder_from_config_dict(d, state_dict)
        return cls(vae, scaling_factor=d["scaling_factor"], shift_factor=d.get("shift_factor"), sample=sample)

    def train(self, mode: bool = True) -> "LatentVAE":
        return super().train(False)  # frozen: always eval

    @property
    def downsample(self) -> int:  # f: 2 ** (number of blocks - 1)
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def scaling_factor(self) -> float:
        return self._scaling_factor

    @property
    def shift_factor(self) -> float:
        return self._shift_factor

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def config_dict(self) -> dict[str, Any]:
        """The AutoencoderKL config as a plain JSON-able dict (no private ``_*`` keys), with the factors
        in use (overrides included)."""
        return autoencoder_config_dict(self.vae, self._scaling_factor, self._shift_factor)

    def fingerprint(self) -> str:
        """A hash of ``config_dict()`` and every weight and buffer (bytes, dtype, shape): equal for two
        VAEs that encode and decode alike, e.g. a latent cache's and a training run's (16 hex digits)."""
        h = hashlib.sha256(json.dumps(self.config_dict(), sort_keys=True).encode())
        if weights.planning_now():  # plan mode: no weights to hash (a planned fingerprint of the config)
            return "planned-" + h.hexdigest()[:8]
        for name, t in sorted(self.vae.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def _check(self, x: Tensor, channels: int, what: str) -> None:
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"LatentVAE.{what} expects (B,{channels},H,W); got {tuple(x.shape)}")

    @torch.no_grad()
    def encode(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """(B,3,H,W) in [-1,1] -> (B,C,H/f,W/f) float32 latents; H, W multiples of f."""
        self._check(images, 3, "encode")
        f = self.downsample
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"LatentVAE.encode: image size {tuple(images.shape[-2:])} is not a multiple of {f}")
        dist = self.vae.encode(images.to(self.dtype)).latent_dist
        z = dist.sample(generator) if self.sample else dist.mean  # (B, C, H/f, W/f)
        return (z.float() - self._shift_factor) * self._scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """(B,C,h,w) normalised latents -> (B,3,h*f,w*f) float32 images, about [-1,1] (not clamped).
        Differentiable in `latents` (the VAE's own parameters stay frozen)."""
        self._check(latents, self.latent_channels, "decode")
        z = latents.float() / self._scaling_factor + self._shift_factor
        return self.vae.decode(z.to(self.dtype)).sample.float()

    def forward(self, images: Tensor) -> Tensor:  # (B,3,H,W) -> (B,3,H,W): decode(encode(images))
        return self.decode(self.encode(images))


def build_latent_vae(cfg: LatentVAEConfig, storage: Any = None) -> LatentVAE:
    """The frozen ``LatentVAE`` of `cfg` (factors: the overrides, else the checkpoint's / export's)."""
    return LatentVAE(build_autoencoder(cfg, storage), scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor,
                     sample=cfg.sample)
