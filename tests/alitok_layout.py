"""Random weights in the layout of AliTok's released checkpoints (github.com/ali-vilab/alitok), at tiny
sizes, for the tests of the adapters (tests/system/models/test_adapters_alitok.py) and of the jobs that
read them (tests/jobs/test_import_alitok.py). The key names and shapes were read from the official
modeling/alitok.py (Encoder, Decoder, VAutoencoder), train_tokenizer/model/vae_stage1.py (the stage-1
aux head and usage buffer) and modeling/ar.py (ARModel, Block, Attention, FeedForward)."""
from __future__ import annotations

import math

import torch


def _blocks(prefix: str, depth: int, w: int, mlp: int) -> dict[str, tuple]:
    out = {}
    for i in range(depth):
        b = f"{prefix}.transformer.{i}."
        out.update({b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "attn.in_proj.weight": (3 * w, w),
                    b + "attn.in_proj.bias": (3 * w,), b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
                    b + "ln_2.weight": (w,), b + "ln_2.bias": (w,), b + "mlp.c_fc.weight": (mlp, w),
                    b + "mlp.c_fc.bias": (mlp,), b + "mlp.c_proj.weight": (w, mlp), b + "mlp.c_proj.bias": (w,)})
    return out


def official_tokenizer(stage1: bool = False, seed: int = 0, image=32, patch=8, prefix=5, w=48, depth=2, dim=8,
                       codes=64, buffers=4) -> dict[str, torch.Tensor]:
    """Random float32 weights under the official tokenizer's key names and shapes (modeling/alitok.py:
    the released stage-2 model; stage1: vae_stage1.py with its aux head and the clustering buffer)."""
    n = (image // patch) ** 2
    s, lead = n + prefix, 1 if stage1 else buffers
    shapes = {
        "latent_tokens": (s, w), "quantize.embedding.weight": (codes, dim),
        "encoder.patch_embed.weight": (w, 3, patch, patch), "encoder.patch_embed.bias": (w,),
        "encoder.positional_embedding": (n, w), "encoder.latent_token_positional_embedding": (s, w),
        "encoder.ln_pre.weight": (w,), "encoder.ln_pre.bias": (w,), "encoder.ln_post.weight": (w,),
        "encoder.ln_post.bias": (w,), "encoder.conv_out.weight": (dim, w, 1, 1), "encoder.conv_out.bias": (dim,),
        "decoder.decoder_embed.weight": (w, dim), "decoder.decoder_embed.bias": (w,),
        "decoder.class_embedding": (lead, w), "decoder.latent_token_positional_embedding": (lead + s, w),
        "decoder.ln_pre.weight": (w,), "decoder.ln_pre.bias": (w,), "decoder.ln_post.weight": (w,),
        "decoder.ln_post.bias": (w,), "decoder.ffn.0.weight": (3 * patch * patch, w, 1, 1),
        "decoder.ffn.0.bias": (3 * patch * patch,), "decoder.conv_out.weight": (3, 3, 1, 1), "decoder.conv_out.bias": (3,),
        **_blocks("encoder", depth, w, 4 * w), **_blocks("decoder", depth, w, 4 * w),
    }
    if stage1:
        shapes.update({"decoder.ffn_aux.0.weight": (3 * patch * patch, w, 1, 1), "decoder.ffn_aux.0.bias": (3 * patch * patch,),
                       "decoder.conv_out_aux.weight": (3, 3, 1, 1), "decoder.conv_out_aux.bias": (3,), "quantize.embed_prob": (codes,)})
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v, generator=g) * (0.2 if len(v) > 1 else 0.05) for k, v in shapes.items()}
    for k in sd:
        if k.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight")):
            sd[k] += 1.0
    return sd


def official_ar(seed: int = 0, dim=64, depth=2, heads=4, vocab=64, classes=10) -> dict[str, torch.Tensor]:
    """Random float32 weights under modeling/ar.py ARModel's key names and shapes (QK RMSNorm per head,
    qkv / proj / output biases, SwiGLU hidden find_multiple(int(8 d / 3), 256), one table of
    vocab + 1 + classes + 1 rows)."""
    hidden = math.ceil(int(8 * dim / 3) / 256) * 256
    hd = dim // heads
    shapes = {"embeddings.weight": (vocab + 1 + classes + 1, dim), "norm.weight": (dim,),
              "output.weight": (vocab, dim), "output.bias": (vocab,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                       b + "attn.q_norm.weight": (hd,), b + "attn.k_norm.weight": (hd,), b + "attn.proj.weight": (dim, dim),
                       b + "attn.proj.bias": (dim,), b + "norm2.weight": (dim,), b + "mlp.w1.weight": (hidden, dim),
                       b + "mlp.w3.weight": (hidden, dim), b + "mlp.w2.weight": (dim, hidden)})
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v, generator=g) * 0.1 for k, v in shapes.items()}
    for k in sd:
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k.endswith("norm.weight"):
            sd[k] += 1.0
    return sd
