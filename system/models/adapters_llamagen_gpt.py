"""State-dict adapter for LlamaGen's public class-conditional GPT checkpoints (c2i_*.pt).

LlamaGen layout (autoregressive/models/gpt.py) -> ours:
  cls_embedding.embedding_table.weight  -> cls_embedding.weight   (1001 rows: 1000 classes + null)
  tok_embeddings.weight, norm.weight, output.weight                 same names
  layers.N.{attention.wqkv, attention.wo, feed_forward.w1/w2/w3,
            attention_norm, ffn_norm}.weight                         same names
  freqs_cis / causal_mask / kv_cache buffers                          dropped (recomputed here)
Checkpoints nest the weights under "model", "module", "state_dict" or "ema"; torch.compile
and DDP/FSDP wrappers may prefix keys with "_orig_mod." or "module.".
"""
from __future__ import annotations

import os
import re

import torch
from torch import Tensor

from system.models import weights
from system.models.gpt import GPT, GPTConfig
from system.models.registry import gpt_config

_NESTED = ("model", "module", "state_dict", "ema")
_PREFIXES = ("_orig_mod.", "module.")
_DROP = re.compile(r"(^|\.)(freqs_cis|causal_mask|k_cache|v_cache)$")
_RENAME = {"cls_embedding.embedding_table.weight": "cls_embedding.weight"}


def unwrap_checkpoint(ckpt: dict) -> dict[str, Tensor]:
    """Find the tensor dict inside a checkpoint and strip wrapper prefixes from its keys."""
    sd = ckpt
    for key in _NESTED:
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"no state dict of tensors found in checkpoint (looked under {_NESTED} and the top level)")
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def convert_llamagen_gpt(sd: dict[str, Tensor], num_classes: int = 1000) -> dict[str, Tensor]:
    """LlamaGen GPT state dict -> our GPT state dict."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if _DROP.search(k):
            continue
        out[_RENAME.get(k, k)] = v
    cls = out.get("cls_embedding.weight")
    if cls is not None and cls.shape[0] == num_classes:  # trained without class dropout: add a null row
        out["cls_embedding.weight"] = torch.cat([cls, torch.zeros_like(cls[:1])])
    return out


def to_llamagen_gpt(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our GPT state dict -> LlamaGen's key layout (for export)."""
    inv = {v: k for k, v in _RENAME.items()}
    return {inv.get(k, k): v for k, v in sd.items()}


def infer_llamagen_size(sd: dict[str, Tensor]) -> str:
    """Preset name matching the state dict's width and depth (llamagen-b .. llamagen-3b)."""
    dim = sd["tok_embeddings.weight"].shape[1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    for name in ("llamagen-b", "llamagen-l", "llamagen-xl", "llamagen-xxl", "llamagen-3b"):
        c = gpt_config(name)
        if (c.dim, c.n_layer) == (dim, depth):
            return name
    raise ValueError(f"no llamagen preset has dim={dim}, depth={depth}; pass name= explicitly")


def llamagen_name_of_file(path: str) -> str:
    """The preset of a LlamaGen checkpoint file name (c2i_B_256.pt ... c2i_3B_384.pt); ValueError otherwise."""
    m = re.search(r"c2i_(b|l|xl|xxl|3b)_", os.path.basename(path).lower())
    if m is None:
        raise ValueError(f"cannot tell the LlamaGen size of {path!r} without reading it: set method.llamagen_preset")
    return f"llamagen-{m.group(1)}"


def load_llamagen_gpt(
    src: str | os.PathLike | dict, name: str | None = None, strict: bool = True, **overrides
) -> GPT:
    """Build a GPT from a LlamaGen c2i checkpoint (path or loaded dict).

    ``name`` picks the preset (inferred from the weights when None); ``overrides``
    go to GPTConfig, e.g. block_size=576 for the 384px checkpoints (24x24 grid). In plan mode
    (system/models/weights.py) a path is not read: the preset is ``name`` or the file's
    (c2i_XXL_384.pt -> llamagen-xxl).
    """
    if not isinstance(src, dict) and not weights.need("LlamaGen c2i GPT", os.fspath(src)):
        return GPT(gpt_config(name or llamagen_name_of_file(os.fspath(src)), **overrides))
    ckpt = torch.load(src, map_location="cpu", weights_only=True) if not isinstance(src, dict) else src
    sd = unwrap_checkpoint(ckpt)
    name = name or infer_llamagen_size(sd)
    cfg: GPTConfig = gpt_config(name, **overrides)
    if sd["tok_embeddings.weight"].shape[0] != cfg.vocab_size:
        raise ValueError(f"checkpoint vocab {sd['tok_embeddings.weight'].shape[0]} != config vocab {cfg.vocab_size}")
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(convert_llamagen_gpt(sd, cfg.num_classes), strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"LlamaGen checkpoint does not fit {name}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model
