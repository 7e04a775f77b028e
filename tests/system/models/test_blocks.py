"""Blocks: SwiGLU sizing, KV-cached attention equals full causal attention, AdaLN zero-init."""
from __future__ import annotations

import torch

from system.models.blocks import KVCache, RMSNorm, SelfAttention, SwiGLU, TransformerBlock, find_multiple
from system.models.rope import rope_1d


def test_find_multiple_and_swiglu_hidden():
    assert find_multiple(2048, 256) == 2048 and find_multiple(2049, 256) == 2304
    assert SwiGLU(768).w1.out_features == 2048  # int(8*768/3)=2048
    assert SwiGLU(1024).w1.out_features == 2816


def test_rmsnorm_unit_rms():
    y = RMSNorm(32)(torch.randn(4, 32) * 7)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4), atol=1e-3, rtol=1e-3)


def test_kv_cache_matches_full_causal():
    torch.manual_seed(0)
    attn = SelfAttention(32, 4, qk_norm=True, qkv_bias=True, backend="math").eval()
    x = torch.randn(2, 7, 32)
    rope = rope_1d(7, 8)
    full = attn(x, rope=rope, causal=True)
    cache = KVCache(2, 4, 10, 8, torch.float32)
    pre = attn(x[:, :4], rope=rope[:4], kv_cache=cache, cache_pos=torch.arange(4))
    outs = [pre]
    for i in range(4, 7):
        outs.append(attn(x[:, i : i + 1], rope=rope[i : i + 1], kv_cache=cache, cache_pos=torch.tensor([i])))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_adaln_zero_init_is_identity_and_uses_cond():
    torch.manual_seed(0)
    blk = TransformerBlock(32, 4, adaln_cond_dim=8)
    x, c = torch.randn(2, 5, 32), torch.randn(2, 8)
    torch.testing.assert_close(blk(x, cond=c), x)  # gates start at zero
    torch.nn.init.normal_(blk.adaln[1].weight)
    y1, y2 = blk(x, cond=c), blk(x, cond=-c)
    assert not torch.allclose(y1, y2)


def test_shared_adaln_block():
    torch.manual_seed(0)
    blk = TransformerBlock(16, 2, adaln_shared=True)
    x, mod = torch.randn(2, 3, 16), torch.randn(2, 6 * 16)
    # zero table + gates from mod: output differs from x once gates are nonzero
    assert not torch.allclose(blk(x, cond=mod), x)
    torch.testing.assert_close(blk(x, cond=torch.zeros(2, 96)), x)
    assert blk.adaln_table.shape == (6, 16)
