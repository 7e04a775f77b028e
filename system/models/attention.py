"""One scaled-dot-product attention function with selectable backends.

Backends: "flash" (flash-attn 2, CUDA + fp16/bf16 only), "sdpa" (torch SDPA),
"math" (explicit softmax reference), "auto" (flash when usable, else sdpa).

Mask convention (as torch SDPA): a bool mask is True where attention is
allowed; a float mask is added to the scores. Masks broadcast to
(B, H, Lq, Lk). ``causal=True`` with Lk > Lq (a KV cache) aligns the causal
diagonal bottom-right: query i sees keys 0 .. Lk - Lq + i.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional dependency
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:  # ImportError, or a broken CUDA build
    _flash_attn_func = None

BACKENDS = ("auto", "flash", "sdpa", "math")


def flash_available() -> bool:
    """True when the flash-attn package imported."""
    return _flash_attn_func is not None


def _flash_reason(q: Tensor, mask: Tensor | None) -> str | None:
    """Why flash-attn cannot run these inputs (None when it can)."""
    if _flash_attn_func is None:
        return "the flash_attn package is not installed"
    if not q.is_cuda:
        return f"tensors are on {q.device}, flash-attn needs CUDA"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype is {q.dtype}, flash-attn needs float16 or bfloat16"
    if mask is not None:
        return "an explicit mask was given, flash-attn supports only causal/no mask"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    return None


def causal_mask(lq: int, lk: int, device: torch.device | str | None = None) -> Tensor:
    """Bool (lq, lk) mask, True where allowed, diagonal aligned bottom-right."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + (lk - lq)


def _merge_masks(q: Tensor, k: Tensor, causal: bool, mask: Tensor | None) -> Tensor | None:
    """Fold ``causal`` into ``mask``; returns a bool or float mask or None."""
    if not causal:
        return mask
    cm = causal_mask(q.shape[-2], k.shape[-2], q.device)
    if mask is None:
        return cm
    if mask.dtype == torch.bool:
        return mask & cm
    return mask.masked_fill(~cm, float("-inf"))


def _math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v.float()).to(q.dtype)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Tensor | None, dropout_p: float) -> Tensor:
    if causal and mask is None and q.shape[-2] == k.shape[-2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    m = _merge_masks(q, k, causal, mask)
    if m is not None and m.dtype != torch.bool:
        m = m.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=dropout_p)


def _flash(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float) -> Tensor:
    # flash-attn layout is (B, L, H, D); its causal mask is aligned bottom-right like ours.
    out = _flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, causal=causal
    )
    return out.transpose(1, 2)


def resolve_backend(backend: str, q: Tensor, mask: Tensor | None = None) -> str:
    """Concrete backend name ("flash", "sdpa" or "math") for these inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "flash" if _flash_reason(q, mask) is None else "sdpa"
    if backend == "flash":
        reason = _flash_reason(q, mask)
        if reason is not None:
            raise RuntimeError(f"attention backend 'flash' cannot run: {reason}; use 'auto' or 'sdpa'")
    return backend


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Attention over q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects q/k/v shaped (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[-2] < q.shape[-2] and causal:
        raise ValueError(f"causal attention needs Lk >= Lq; got Lq={q.shape[-2]}, Lk={k.shape[-2]}")
    name = resolve_backend(backend, q, mask)
    if name == "flash":
        return _flash(q, k, v, causal, dropout_p)
    if name == "sdpa":
        return _sdpa(q, k, v, causal, mask, dropout_p)
    return _math(q, k, v, _merge_masks(q, k, causal, mask), dropout_p)
