"""State-dict adapters for AliTok's released checkpoints (github.com/ali-vilab/alitok), read into our
models: the tokenizer into `Tokenizer1D` with the official decoder layout, the AR model into `GPT`.

File formats (the official loaders: `sample_imagenet.py`, `pretokenization.py`, `demo_util.py`):
- tokenizer `weights/AliTok.pth`: a `torch.save`d state dict of `modeling/alitok.py` `AliTok()`,
  loaded with `strict=True`; float32 tensors. A training checkpoint of `train_tokenizer/`
  (`{"model_state": ..., "criterion_state": ..., ...}`, the stage-1 `vae_stage1.py` model with its
  aux head and usage buffer) reads too.
- AR `weights/alitok_{b,l,xl}.bin`: a `torch.save`d state dict of `modeling/ar.py` `ARModel`
  (`BaseModel.save_pretrained_weight`), float32.
Both load with `torch.load(weights_only=True)`; safetensors files with the same keys read too.

Tokenizer keys -> ours (every tensor is consumed; a key left over or missing is an error):
  latent_tokens + encoder.latent_token_positional_embedding  -> encoder.latent_tokens (their sum:
      the official encoder only ever reads the sum)
  encoder.patch_embed.* (on [0, 1] images) -> encoder.patch_embed.* on [-1, 1] images: W / 2, b + sum(W) / 2
  encoder.positional_embedding (N, W)      -> encoder.pos_embed (1, N, W)
  {encoder,decoder}.ln_pre / ln_post       -> .vit.ln_pre / .vit.ln_post
  .transformer.i.{ln_1, attn.in_proj, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}
                                           -> .vit.blocks.i.{norm1, attn.wqkv, attn.wo, norm2, mlp.0, mlp.2}
  encoder.conv_out (D, W, 1, 1)            -> encoder.to_latent (D, W)
  quantize.embedding.weight                -> quantizer.embedding.weight
  quantize.embed_prob (stage 1 only)       dropped: the training-time usage EMA of the clustering VQ
  decoder.decoder_embed.*                  -> decoder.embed.*
  decoder.class_embedding (T, W) + decoder.latent_token_positional_embedding (T + S, W)
                                           -> decoder.buffer_tokens = class + pos[:T] (the lead tokens),
                                              decoder.latent_pos = pos[T:]
  decoder.ffn.0 (3 p p, W, 1, 1)           -> decoder.to_pixels; decoder.conv_out (3, 3, 1, 1) -> decoder.to_rgb
  decoder.ffn_aux.0 / conv_out_aux (stage 1) -> decoder.prefix_head / decoder.prefix_rgb
The sizes are read off the shapes (the official code hard-codes 256 px, 17 prefix tokens, widths
768 / 1024, depths 12 / 24); the head counts are not in the weights (official 12 / 16). Images: the
official model takes and returns [0, 1]; ours [-1, 1] (the input affine is folded into the patch
embedding; the sigmoid output s is returned as 2 s - 1).
The released tokenizer is stage 2's: bidirectional over [32 buffer tokens; 17 prefix; 256 latents],
the prefix kept as input, patches read off the last 256 outputs.

AR keys -> ours:
  embeddings.weight (V + 1 + C + 1, d): one table for codes and classes. Rows 0..V-1 -> tok_embeddings;
      rows V+1 .. V+C+1 -> cls_embedding (C classes, then the null class: condition + V + 1, and
      `none_condition_id` = C + V + 1). Row V is never read by the official code (no id maps to it).
  blocks.i.{norm1, attn.qkv, attn.q_norm, attn.k_norm, attn.proj, norm2, mlp.w1/w2/w3}
      -> layers.i.{attention_norm, attention.wqkv, attention.q_norm, attention.k_norm, attention.wo,
         ffn_norm, feed_forward.w1/w2/w3}
  norm, output (with bias)                 same names
The official RoPE is built for 17 prefix tokens (1D) and a 16 x 16 grid offset by 17 (2D): our
alitok-* presets with prefix_tokens=17, block_size=256.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Optional

import torch
from torch import Tensor

from system.models.gpt import GPT, GPTConfig
from system.models.quantizers import QuantizerConfig
from system.models.registry import gpt_config
from system.models.tokenizer1d import Tokenizer1D, Tokenizer1DConfig, Tokenizer1DFrozen

# the official tokenizer's head counts (modeling/alitok.py Encoder / Decoder: 12, 16); not in the weights
OFFICIAL_HEADS = {"enc_heads": 12, "dec_heads": 16}
OFFICIAL_AR_PREFIX = 17  # modeling/ar.py: precompute_freqs_cis(17, ...), precompute_freqs_cis_2d(17, 16, ...)
_AR_SIZES = ("alitok-b", "alitok-l", "alitok-xl")
_BLOCK = {"ln_1": "norm1", "attn.in_proj": "attn.wqkv", "attn.out_proj": "attn.wo", "ln_2": "norm2",
          "mlp.c_fc": "mlp.0", "mlp.c_proj": "mlp.2"}
_AR_BLOCK = {"norm1": "attention_norm", "attn.qkv": "attention.wqkv", "attn.q_norm": "attention.q_norm",
             "attn.k_norm": "attention.k_norm", "attn.proj": "attention.wo", "norm2": "ffn_norm",
             "mlp.w1": "feed_forward.w1", "mlp.w2": "feed_forward.w2", "mlp.w3": "feed_forward.w3"}


def read_checkpoint(src: str | os.PathLike | dict) -> dict[str, Tensor]:
    """An official AliTok checkpoint (a path: torch.save'd .pth/.bin or .safetensors; or a loaded
    dict) -> its float32 state dict; a training checkpoint's "model_state" is unwrapped."""
    if isinstance(src, dict):
        raw = src
    else:
        path = os.fspath(src)
        if not os.path.exists(path):
            raise FileNotFoundError(f"AliTok checkpoint not found: {path}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            raw = load_file(path)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(raw, dict) and isinstance(raw.get("model_state"), dict):
        raw = raw["model_state"]
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, Tensor) for v in raw.values()):
        raise ValueError("not an AliTok state dict: expected a dict of tensors (or a training checkpoint's model_state)")
    return {k.removeprefix("module."): v.float() if v.is_floating_point() else v for k, v in raw.items()}


class _Keys:
    """Takes tensors out of a state dict by name; `rest()` names what was never taken."""

    def __init__(self, sd: dict[str, Tensor], what: str):
        self.sd, self.what, self.used = sd, what, set()

    def __contains__(self, key: str) -> bool:
        return key in self.sd

    def __call__(self, key: str) -> Tensor:
        if key not in self.sd:
            raise ValueError(f"{self.what}: missing tensor {key!r}")
        self.used.add(key)
        return self.sd[key]

    def drop(self, key: str) -> None:
        self.used.add(key)

    def depth(self, prefix: str) -> int:
        return len({int(m.group(1)) for k in self.sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})

    def check_all_used(self) -> None:
        rest = sorted(set(self.sd) - self.used)
        if rest:
            raise ValueError(f"{self.what}: {len(rest)} tensor(s) not used: {rest[:8]}")


# ---------------------------------------------------------------------------- tokenizer
def alitok_tokenizer_config(sd: dict[str, Tensor], enc_heads: int = 12, dec_heads: int = 16) -> Tokenizer1DConfig:
    """Our Tokenizer1DConfig of an official AliTok tokenizer state dict (sizes read off the shapes)."""
    k = _Keys(sd, "AliTok tokenizer")
    w_enc, _, patch, _ = k("encoder.patch_embed.weight").shape
    n = k("encoder.positional_embedding").shape[0]
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"AliTok tokenizer: {n} patch positions is not a square grid")
    seq, latent_dim = k("latent_tokens").shape[0], k("encoder.conv_out.weight").shape[0]
    codes = k("quantize.embedding.weight").shape[0]
    w_dec = k("decoder.decoder_embed.weight").shape[0]
    lead = k("decoder.class_embedding").shape[0]
    causal = "decoder.ffn_aux.0.weight" in k  # the stage-1 decoder (vae_stage1.py) has the aux head
    if causal and lead != 1:
        raise ValueError(f"AliTok stage-1 tokenizer: the causal decoder has one class token, got {lead}")
    mlp = k("encoder.transformer.0.mlp.c_fc.weight").shape[0] / w_enc
    vq = QuantizerConfig(type="vq", codebook_size=codes, dim=latent_dim, commit_weight=0.25, codebook_weight=1.0)
    return Tokenizer1DConfig(
        image_size=grid * patch, patch_size=patch, enc_width=w_enc, enc_depth=k.depth("encoder.transformer."),
        enc_heads=enc_heads, dec_width=w_dec, dec_depth=k.depth("decoder.transformer."), dec_heads=dec_heads,
        mlp_ratio=mlp, num_latent_tokens=n, latent_dim=latent_dim, quantizer=vq, decoder_causal=causal,
        decoder_layout="latents", num_prefix_tokens=seq - n, num_buffer_tokens=0 if causal else lead,
        decoder_reads_prefix=True, proj_bias=True)


def _vit(k: _Keys, src: str, dst: str, out: dict[str, Tensor]) -> None:
    for part in ("ln_pre", "ln_post"):
        for p in ("weight", "bias"):
            out[f"{dst}.vit.{part}.{p}"] = k(f"{src}.{part}.{p}")
    for i in range(k.depth(f"{src}.transformer.")):
        for theirs, ours in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{dst}.vit.blocks.{i}.{ours}.{p}"] = k(f"{src}.transformer.{i}.{theirs}.{p}")


def _conv1x1(k: _Keys, key: str) -> Tensor:
    return k(key).flatten(1)  # (out, in, 1, 1) -> (out, in)


def convert_alitok_tokenizer(sd: dict[str, Tensor], cfg: Tokenizer1DConfig) -> dict[str, Tensor]:
    """Official AliTok tokenizer state dict -> our Tokenizer1D state dict (module doc); every
    tensor used, none left over."""
    k = _Keys(sd, "AliTok tokenizer")
    w, b = k("encoder.patch_embed.weight"), k("encoder.patch_embed.bias")
    out: dict[str, Tensor] = {
        # the official encoder reads images in [0, 1], ours in [-1, 1]: conv((x + 1) / 2) folded into the conv
        "encoder.patch_embed.weight": w / 2,
        "encoder.patch_embed.bias": b + w.sum(dim=(1, 2, 3)) / 2,
        "encoder.pos_embed": k("encoder.positional_embedding")[None],
        "encoder.latent_tokens": k("latent_tokens") + k("encoder.latent_token_positional_embedding"),
        "encoder.to_latent.weight": _conv1x1(k, "encoder.conv_out.weight"),
        "encoder.to_latent.bias": k("encoder.conv_out.bias"),
        "quantizer.embedding.weight": k("quantize.embedding.weight"),
        "decoder.embed.weight": k("decoder.decoder_embed.weight"),
        "decoder.embed.bias": k("decoder.decoder_embed.bias"),
        "decoder.to_pixels.weight": _conv1x1(k, "decoder.ffn.0.weight"),
        "decoder.to_pixels.bias": k("decoder.ffn.0.bias"),
        "decoder.to_rgb.weight": _conv1x1(k, "decoder.conv_out.weight"),
        "decoder.to_rgb.bias": k("decoder.conv_out.bias"),
    }
    if "quantize.embed_prob" in k:
        k.drop("quantize.embed_prob")
    lead, pos = k("decoder.class_embedding"), k("decoder.latent_token_positional_embedding")
    t = lead.shape[0]
    out["decoder.buffer_tokens"] = lead + pos[:t]
    out["decoder.latent_pos"] = pos[t:][None]
    _vit(k, "encoder", "encoder", out)
    _vit(k, "decoder", "decoder", out)
    if cfg.decoder_causal:
        out.update({"decoder.prefix_head.weight": _conv1x1(k, "decoder.ffn_aux.0.weight"),
                    "decoder.prefix_head.bias": k("decoder.ffn_aux.0.bias"),
                    "decoder.prefix_rgb.weight": _conv1x1(k, "decoder.conv_out_aux.weight"),
                    "decoder.prefix_rgb.bias": k("decoder.conv_out_aux.bias")})
    k.check_all_used()
    return out


def load_alitok_tokenizer(src: str | os.PathLike | dict, enc_heads: int = 12, dec_heads: int = 16) -> Tokenizer1D:
    """An official AliTok tokenizer checkpoint (path or state dict) -> our Tokenizer1D (eval mode),
    every tensor of the file used and every one of ours loaded (strict)."""
    sd = read_checkpoint(src)
    cfg = alitok_tokenizer_config(sd, enc_heads, dec_heads)
    model = Tokenizer1D(cfg)
    model.load_state_dict(convert_alitok_tokenizer(sd, cfg), strict=True)
    return model.eval()


class AliTokReleasedTokenizer:
    """Tokenizer kind "alitok-released": an export part holding an official AliTok tokenizer state dict
    (official key names; config {"enc_heads", "dec_heads"}); it loads as our tokenizer1d (its
    `artifact()` re-exports it in our layout, e.g. beside a VAπ-post-trained policy)."""

    kind = "alitok-released"
    wraps = None  # builds a Tokenizer1DFrozen: not the frozen adapter of a model class of its own

    @staticmethod
    def from_export(config: dict, state_dict: dict[str, Tensor]) -> Tokenizer1DFrozen:
        heads = {**OFFICIAL_HEADS, **config}
        return Tokenizer1DFrozen(load_alitok_tokenizer(state_dict, heads["enc_heads"], heads["dec_heads"]))


# ---------------------------------------------------------------------------- AR model
def alitok_gpt_config(sd: dict[str, Tensor], preset: Optional[str] = None, **overrides: Any) -> GPTConfig:
    """Our GPTConfig of an official AliTok AR state dict: the alitok-* preset of its width and depth
    (or `preset`), 17 prefix tokens and a 16 x 16 grid (the official RoPE), vocabulary and classes
    read off the shapes; `overrides` change single fields."""
    k = _Keys(sd, "AliTok AR")
    vocab, dim = k("output.weight").shape
    depth = k.depth("blocks.")
    if preset is None:
        preset = next((n for n in _AR_SIZES if (gpt_config(n).dim, gpt_config(n).n_layer) == (dim, depth)), None)
        if preset is None:
            raise ValueError(f"AliTok AR: no alitok-* preset has width {dim} and depth {depth}; pass the preset")
    classes = k("embeddings.weight").shape[0] - vocab - 2
    fields = dict(vocab_size=vocab, num_classes=classes, prefix_tokens=OFFICIAL_AR_PREFIX, block_size=256,
                  dim=dim, n_layer=depth)
    return gpt_config(preset, **{**fields, **overrides})


def convert_alitok_ar(sd: dict[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    """Official AliTok ARModel state dict -> our GPT state dict (module doc); every tensor used."""
    k = _Keys(sd, "AliTok AR")
    table, v, c = k("embeddings.weight"), cfg.vocab_size, cfg.num_classes
    if table.shape[0] != v + c + 2:
        raise ValueError(f"AliTok AR: embeddings has {table.shape[0]} rows; expected {v} codes + 1 + {c} classes + 1 (null)")
    out = {"tok_embeddings.weight": table[:v], "cls_embedding.weight": table[v + 1:],
           "norm.weight": k("norm.weight"), "output.weight": k("output.weight"), "output.bias": k("output.bias")}
    for i in range(k.depth("blocks.")):
        for theirs, ours in _AR_BLOCK.items():
            for p in ("weight", "bias"):
                key = f"blocks.{i}.{theirs}.{p}"
                if p == "weight" or key in k:
                    out[f"layers.{i}.{ours}.{p}"] = k(key)
    k.check_all_used()
    return out


def load_alitok_gpt(src: str | os.PathLike | dict, preset: Optional[str] = None, **overrides: Any) -> GPT:
    """An official AliTok AR checkpoint (path or state dict) -> our GPT (eval mode), strict."""
    sd = read_checkpoint(src)
    cfg = alitok_gpt_config(sd, preset, **overrides)
    model = GPT(cfg)
    model.load_state_dict(convert_alitok_ar(sd, cfg), strict=True)
    return model.eval()
