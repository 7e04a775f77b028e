"""Frozen vision teachers (DINOv2 for EOSTok, SigLIP for SemTok) built with transformers.

``Teacher(x)`` takes images in [-1, 1] (B,3,H,W), resizes them to the teacher's input size,
applies the teacher's own normalisation and returns patch features (B, N, C) with the CLS and
register tokens removed. Weights come from a local directory (``from_pretrained`` with
``local_files_only=True``), a hub name (cluster with internet), or random init (tests); in plan mode
(system/models/weights.py) none are read: the architecture comes from the local config.json or,
for a known hub name, a built-in config.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from system.config.methods import TeacherConfig, TeacherKind  # noqa: F401 (re-exported)
from system.models import weights

_NORM = {
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet mean/std
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def _random_config(cfg: TeacherConfig):
    from transformers import Dinov2Config, SiglipVisionConfig

    size = cfg.image_size
    if cfg.kind == "dinov2":
        kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2) if cfg.tiny else {}
        return Dinov2Config(image_size=size or 224, patch_size=14, **kw)
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2) if cfg.tiny else {}
    return SiglipVisionConfig(image_size=size or 224, patch_size=16, vision_use_head=False, **kw)


def _pretrained_class(kind: TeacherKind, model_type: str):
    from transformers import Dinov2Model, Dinov2WithRegistersModel, SiglipVisionModel

    table = {
        ("dinov2", "dinov2"): Dinov2Model,
        ("dinov2", "dinov2_with_registers"): Dinov2WithRegistersModel,
        ("siglip", "siglip"): SiglipVisionModel,
        ("siglip", "siglip_vision_model"): SiglipVisionModel,
    }
    if (kind, model_type) not in table:
        ok = [m for k, m in table if k == kind]
        raise ValueError(f"TeacherConfig.kind={kind!r} but the checkpoint's model_type is {model_type!r}; expected one of {ok}")
    return table[(kind, model_type)]


def build_teacher_model(cfg: TeacherConfig) -> nn.Module:
    """The underlying transformers vision model (not yet frozen)."""
    if cfg.kind not in _NORM:
        raise ValueError(f"TeacherConfig.kind={cfg.kind!r}; expected 'dinov2' or 'siglip'")
    source = cfg.path or cfg.hub_name
    if source is not None and cfg.random_init:
        raise ValueError("TeacherConfig: random_init=True conflicts with path/hub_name; set one or the other")
    if source is None and not cfg.random_init:
        weights.unset(f"{cfg.kind} teacher", "teacher.path or hub_name",
                      f"TeacherConfig(kind={cfg.kind!r}) has no weights: set path (a local from_pretrained directory), "
                      "hub_name (needs internet), or random_init=True (tests only)")
        return planned_teacher_model(cfg)  # plan mode: the paper's default teacher of this kind
    if cfg.random_init:
        from transformers import Dinov2Model, SiglipVisionModel

        mcfg = _random_config(cfg)
        return (Dinov2Model if cfg.kind == "dinov2" else SiglipVisionModel)(mcfg)
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    local = cfg.path is not None
    if not weights.need(f"{cfg.kind} teacher", source, hub=not local):
        return planned_teacher_model(cfg)
    model_type = AutoConfig.from_pretrained(source, local_files_only=local).model_type
    cls = _pretrained_class(cfg.kind, model_type)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a full SigLIP checkpoint lists every text-tower key as unexpected
    try:
        model, info = cls.from_pretrained(source, local_files_only=local, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    bad = list(info.get("missing_keys", [])) + list(info.get("mismatched_keys", []))
    if bad:
        raise ValueError(f"teacher checkpoint {source!r} lacks weights for {cls.__name__}: {bad[:5]} ({len(bad)} in all)")
    return model


# plan mode (system/models/weights.py): the architecture of a known hub name without its config.json.
# size token -> (hidden, intermediate or mlp ratio, layers, heads); the name gives patch and image size
_DINOV2_SIZES = {"small": (384, 4, 12, 6), "base": (768, 4, 12, 12), "large": (1024, 4, 24, 16), "giant": (1536, 4, 40, 24)}
_SIGLIP_SIZES = {"base": (768, 3072, 12, 12), "large": (1024, 4096, 24, 16), "so400m": (1152, 4304, 27, 16),
                 "giant-opt": (1536, 6144, 40, 16)}


def builtin_teacher_config(kind: TeacherKind, name: str):
    """The transformers vision config of a known hub name (facebook/dinov2-{small,base,large,giant}[-with-
    registers...], google/siglip[2]-{base,large,so400m,giant-opt}-patch<P>-<S>); ValueError otherwise."""
    import re

    from transformers import Dinov2Config, Dinov2WithRegistersConfig, SiglipVisionConfig

    base = name.rstrip("/").split("/")[-1].lower()
    if kind == "dinov2":
        m = re.match(r"dinov2(-with-registers)?-(small|base|large|giant)", base)
        if m:
            hidden, ratio, layers, heads = _DINOV2_SIZES[m.group(2)]
            kw = dict(hidden_size=hidden, mlp_ratio=ratio, num_hidden_layers=layers, num_attention_heads=heads,
                      image_size=518, patch_size=14, use_swiglu_ffn=m.group(2) == "giant")
            return Dinov2WithRegistersConfig(num_register_tokens=4, **kw) if m.group(1) else Dinov2Config(**kw)
    else:
        m = re.match(r"siglip2?-(base|large|so400m|giant-opt)-patch(\d+)-(\d+)", base)
        if m:
            hidden, inter, layers, heads = _SIGLIP_SIZES[m.group(1)]
            return SiglipVisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                      num_attention_heads=heads, patch_size=int(m.group(2)), image_size=int(m.group(3)))
    raise ValueError(f"TeacherConfig(kind={kind!r}): no built-in architecture for {name!r} to plan with; give "
                     "method.teacher.path (a local folder with its config.json)")


def planned_teacher_model(cfg: TeacherConfig) -> nn.Module:
    """Plan mode: the teacher's architecture, weights not read (the local checkpoint's config.json
    when there is one, else the built-in config of its hub name)."""
    from transformers import AutoConfig

    folder = cfg.path or ""
    if folder and os.path.isfile(os.path.join(folder, "config.json")):
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        cls = _pretrained_class(cfg.kind, config.model_type)
        config = getattr(config, "vision_config", config)  # a full SigLIP (text + vision) checkpoint
    else:
        default = "facebook/dinov2-base" if cfg.kind == "dinov2" else "google/siglip2-so400m-patch16-256"  # the papers'
        config = builtin_teacher_config(cfg.kind, cfg.path or cfg.hub_name or default)
        cls = _pretrained_class(cfg.kind, config.model_type)
    return cls(config)


class Teacher(nn.Module):
    """Frozen teacher: (B,3,H,W) in [-1,1] -> patch features (B, N, C), float32, no grad."""

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = build_teacher_model(cfg)
        mcfg = self.model.config
        self.patch_size = int(mcfg.patch_size if isinstance(mcfg.patch_size, int) else mcfg.patch_size[0])
        native = int(mcfg.image_size if isinstance(mcfg.image_size, int) else mcfg.image_size[0])
        self.image_size = int(cfg.image_size or native)
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"TeacherConfig.image_size={self.image_size} is not a multiple of patch size {self.patch_size}")
        self._interp_pos = cfg.kind == "siglip" and self.image_size != native
        mean, std = _NORM[cfg.kind]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # frozen: always eval

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B,3,H,W) in [-1,1] -> (B, N, C)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Teacher expects (B,3,H,W) images in [-1,1]; got {tuple(images.shape)}")
        x = (images.float() + 1.0) / 2.0
        s = self.image_size
        if x.shape[-2:] != (s, s):
            shrink = x.shape[-2] > s or x.shape[-1] > s
            x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=shrink).clamp(0.0, 1.0)
        x = (x - self.mean) / self.std
        dtype = next(self.model.parameters()).dtype
        kwargs = {"interpolate_pos_encoding": True} if self._interp_pos else {}
        hidden = self.model(pixel_values=x.to(dtype), **kwargs).last_hidden_state  # (B, [cls+reg]+N, C)
        n = self.grid[0] * self.grid[1]
        return hidden[:, -n:].float()


def build_teacher(cfg: TeacherConfig | None) -> Teacher | None:
    """Teachers are optional: ``None`` config -> ``None``."""
    return None if cfg is None else Teacher(cfg)
