"""Shared transformer pieces: RMSNorm, SwiGLU, self-attention with KV cache, AdaLN, block.

Parameter names follow LlamaGen (wqkv, wo, w1/w2/w3, attention_norm, ffn_norm)
so its checkpoints map onto ours with few renames.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from system.models.attention import attention, cache_attention, host_span
from system.models.rope import apply_rope


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of k that is >= n."""
    return n if n % k == 0 else n + k - (n % k)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN modulation x * (1 + scale) + shift; shift/scale (B, D) or (B, L, D)."""
    if shift.dim() == x.dim() - 1:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return x * (1 + scale) + shift


def zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (AdaLN-Zero); returns it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32, learnable gain."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # (..., D) -> (..., D)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) with hidden size find_multiple(int(8*dim/3), 256) by default."""

    def __init__(self, dim: int, hidden: int | None = None, dropout: float = 0.0):
        super().__init__()
        hidden = hidden or find_multiple(int(8 * dim / 3), 256)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (B, L, D) -> (B, L, D)
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache(nn.Module):
    """Static per-layer cache, k/v preallocated as (B, H, max_len, D).

    ``dtype=None`` keeps the keys in the dtype the layer computes them in (e.g. bfloat16 under
    autocast with float32 weights), allocated at the first write: the same values as a float32
    cache (bfloat16 numbers either way), half the memory, no cast of the whole cache per step,
    and flash-attn can read it in place.
    """

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, dtype: torch.dtype | None, device=None):
        super().__init__()
        shape = (batch, n_heads, max_len, head_dim)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.adopt_dtype = dtype is None  # allocated at the first write, in the keys' dtype (meta until then)
        where = "meta" if dtype is None else self.device
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=where), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=where), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v (B, H, S, D) at positions pos (S,) (host or device); return the full caches."""
        if self.adopt_dtype:  # the first write: allocate in the keys' dtype
            self.adopt_dtype = False
            self.k = torch.zeros(self.k.shape, dtype=k.dtype, device=self.device)
            self.v = torch.zeros(self.v.shape, dtype=v.dtype, device=self.device)
        span = host_span(pos)
        if span is not None:  # consecutive host positions: a plain copy into the slice, no index tensor
            self.k.narrow(2, span[0], span[1]).copy_(k)
            self.v.narrow(2, span[0], span[1]).copy_(v)
        else:
            pos = pos.to(self.k.device)
            self.k.index_copy_(2, pos, k.to(self.k.dtype))
            self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k, self.v


class SelfAttention(nn.Module):
    """Multi-head self-attention with optional QK-norm, qkv bias, RoPE and a static KV cache."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        qk_norm: bool = False,
        qkv_bias: bool = False,
        attn_dropout: float = 0.0,
        resid_dropout: float = 0.0,
        backend: str = "auto",
        norm_eps: float = 1e-5,
        proj_bias: bool = False,
    ):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.dim, self.n_heads, self.head_dim = dim, n_heads, dim // n_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.wo = nn.Linear(dim, dim, bias=proj_bias)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.attn_dropout = attn_dropout
        self.resid_dropout = nn.Dropout(resid_dropout)
        self.backend = backend

    def forward(
        self,
        x: Tensor,
        rope: Tensor | None = None,
        mask: Tensor | None = None,
        causal: bool = False,
        kv_cache: KVCache | None = None,
        cache_pos: Tensor | None = None,
    ) -> Tensor:
        """x (B, L, D) -> (B, L, D).

        rope: (L, hd/2, 2) table rows for these L positions. With ``kv_cache``,
        ``cache_pos`` (L,) gives the write positions (same for every row; host
        positions let the step read only the filled part of the cache, see
        ``attention.cache_attention``); key j is visible to query i iff
        j <= cache_pos[i], unless ``mask`` (L, max_len) is given, which then
        replaces that rule (over the whole cache).
        """
        b, l, _ = x.shape
        q, k, v = self.wqkv(x).view(b, l, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        drop = self.attn_dropout if self.training else 0.0
        if kv_cache is not None:
            if cache_pos is None:
                raise ValueError("kv_cache given without cache_pos (the positions to write)")
            k, v = kv_cache.update(cache_pos, k, v)
            if mask is None:  # key j visible to query i iff j <= cache_pos[i]
                out = cache_attention(q, k, v, cache_pos, dropout_p=drop, backend=self.backend)
            else:
                out = attention(q, k.to(q.dtype), v.to(q.dtype), mask=mask, dropout_p=drop, backend=self.backend)
        else:
            out = attention(q, k, v, causal=causal, mask=mask, dropout_p=drop, backend=self.backend)
        out = out.transpose(1, 2).reshape(b, l, self.dim)
        return self.resid_dropout(self.wo(out))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)); x + swiglu(norm(x)); optional AdaLN-Zero conditioning."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        *,
        mlp_hidden: int | None = None,
        qk_norm: bool = False,
        qkv_bias: bool = False,
        proj_bias: bool = False,
        attn_dropout: float = 0.0,
        resid_dropout: float = 0.0,
        ffn_dropout: float = 0.0,
        norm_eps: float = 1e-5,
        backend: str = "auto",
        adaln_cond_dim: int | None = None,
        adaln_shared: bool = False,
    ):
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = SelfAttention(dim, n_heads, qk_norm, qkv_bias, attn_dropout, resid_dropout, backend, norm_eps,
                                       proj_bias)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.feed_forward = SwiGLU(dim, mlp_hidden, ffn_dropout)
        self.adaln = self.adaln_table = None
        if adaln_cond_dim is not None and adaln_shared:
            raise ValueError("choose per-block AdaLN (adaln_cond_dim) or shared AdaLN (adaln_shared), not both")
        if adaln_cond_dim is not None:
            self.adaln = zero_init(nn.Sequential(nn.SiLU(), nn.Linear(adaln_cond_dim, 6 * dim)))
        if adaln_shared:  # PixArt-style "adaLN-single": the model computes one (B, 6*dim) modulation
            self.adaln_table = nn.Parameter(torch.zeros(6, dim))

    def forward(
        self,
        x: Tensor,
        rope: Tensor | None = None,
        mask: Tensor | None = None,
        causal: bool = False,
        cond: Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_pos: Tensor | None = None,
    ) -> Tensor:
        """x (B, L, D) -> (B, L, D).

        cond: per-block AdaLN -> (B, C) or (B, L, C); shared AdaLN -> the model's
        (B, 6*D) modulation, to which this block adds its own (6, D) table.
        """
        if self.adaln is None and self.adaln_table is None:
            x = x + self.attention(self.attention_norm(x), rope, mask, causal, kv_cache, cache_pos)
            return x + self.feed_forward(self.ffn_norm(x))
        if cond is None:
            raise ValueError("this block uses AdaLN and needs a cond tensor")
        if self.adaln is not None:
            mod = self.adaln(cond)
        else:
            mod = (cond.unflatten(-1, (6, -1)) + self.adaln_table).flatten(-2)
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
        if mod.dim() == 2:
            g1, g2 = g1.unsqueeze(1), g2.unsqueeze(1)
        h = modulate(self.attention_norm(x), sh1, sc1)
        x = x + g1 * self.attention(h, rope, mask, causal, kv_cache, cache_pos)
        return x + g2 * self.feed_forward(modulate(self.ffn_norm(x), sh2, sc2))
