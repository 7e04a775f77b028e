"""Rotary position embeddings: 1D, 2D (LlamaGen-style) and AliTok's mixed layout.

A RoPE *table* is a float32 tensor of shape (L, D/2, 2) holding (cos, sin) of
the rotation angle for each of the D/2 interleaved channel pairs
(x[2i], x[2i+1]) at each of the L sequence positions. ``apply_rope`` rotates
q or k shaped (B, H, L, D) with such a table (or a per-sample (B, L, D/2, 2)).

Class tokens: LlamaGen fills their rows with zeros (cos = sin = 0), which
zeroes the class token's q/k (it still contributes its value). That is the
default here (``cls_fill="zeros"``) so public checkpoints reproduce exactly;
``cls_fill="identity"`` (cos = 1, sin = 0) leaves q/k unrotated instead.
"""
from __future__ import annotations

import torch
from torch import Tensor

CLS_FILLS = ("zeros", "identity")
ROPE_KINDS = ("1d", "2d", "mixed", "none")


def _freqs(n_pairs: int, dim: int, base: float) -> Tensor:
    """Inverse frequencies base^(-2i/dim), i < n_pairs (float32)."""
    return 1.0 / (base ** (torch.arange(0, 2 * n_pairs, 2, dtype=torch.float64)[:n_pairs] / dim))


def _table(angles: Tensor) -> Tensor:
    """(L, P) angles -> (L, P, 2) float32 (cos, sin)."""
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).float()


def cls_table(n: int, head_dim: int, fill: str = "zeros") -> Tensor:
    """(n, D/2, 2) rows for class/condition tokens."""
    if fill not in CLS_FILLS:
        raise ValueError(f"cls_fill {fill!r} unknown; expected one of {CLS_FILLS}")
    t = torch.zeros(n, head_dim // 2, 2)
    if fill == "identity":
        t[..., 0] = 1.0
    return t


def rope_1d(positions: int | Tensor, head_dim: int, base: float = 10000.0) -> Tensor:
    """1D RoPE over the whole head dim -> (L, D/2, 2). ``positions``: count or 1D tensor."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    pos = torch.arange(positions) if isinstance(positions, int) else positions
    freqs = _freqs(head_dim // 2, head_dim, base)  # (D/2,)
    return _table(torch.outer(pos.to(torch.float64), freqs))


def rope_2d(grid: int | tuple[int, int], head_dim: int, base: float = 10000.0, offset: int = 0) -> Tensor:
    """2D RoPE for a raster-ordered grid -> (H*W, D/2, 2).

    The first D/4 channel pairs rotate with the row index, the last D/4 with
    the column index (both shifted by ``offset``); the frequencies are those of
    a 1D RoPE over half the head dim, as in LlamaGen.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    half = head_dim // 2
    freqs = _freqs(half // 2, half, base)  # (D/4,)
    rows = torch.arange(gh, dtype=torch.float64) + offset
    cols = torch.arange(gw, dtype=torch.float64) + offset
    fr = torch.outer(rows, freqs)[:, None, :].expand(gh, gw, -1)
    fc = torch.outer(cols, freqs)[None, :, :].expand(gh, gw, -1)
    return _table(torch.cat([fr, fc], dim=-1).reshape(gh * gw, half))


def rope_mixed(
    head_dim: int,
    n_cls: int,
    n_prefix: int,
    grid: int | tuple[int, int],
    base: float = 10000.0,
    image_offset: int | None = None,
    cls_fill: str = "zeros",
) -> Tensor:
    """AliTok layout -> (n_cls + n_prefix + H*W, D/2, 2).

    Class tokens get ``cls_fill`` rows, prefix tokens 1D positions 0..K-1 and
    image tokens 2D positions shifted by ``image_offset`` (default K, so the
    image grid starts where the prefix sequence ends).
    """
    off = n_prefix if image_offset is None else image_offset
    parts = [cls_table(n_cls, head_dim, cls_fill), rope_1d(n_prefix, head_dim, base), rope_2d(grid, head_dim, base, off)]
    return torch.cat(parts, dim=0)


def build_rope(
    kind: str,
    head_dim: int,
    n_cls: int,
    n_prefix: int,
    grid: int | tuple[int, int],
    base: float = 10000.0,
    cls_fill: str = "zeros",
) -> Tensor:
    """Table for a sequence [cls; prefix; image] under layout ``kind``."""
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    if kind == "1d":
        rest = rope_1d(n_prefix + gh * gw, head_dim, base)
        return torch.cat([cls_table(n_cls, head_dim, cls_fill), rest], dim=0)
    if kind == "2d":
        if n_prefix:
            raise ValueError(f"rope '2d' has no place for {n_prefix} prefix tokens; use rope='mixed'")
        return torch.cat([cls_table(n_cls, head_dim, cls_fill), rope_2d((gh, gw), head_dim, base)], dim=0)
    if kind == "mixed":
        return rope_mixed(head_dim, n_cls, n_prefix, (gh, gw), base, cls_fill=cls_fill)
    if kind == "none":
        return cls_table(n_cls + n_prefix + gh * gw, head_dim, "identity")
    raise ValueError(f"unknown rope layout {kind!r}; expected one of {ROPE_KINDS}")


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate x (B, H, L, D) by table (L, D/2, 2) or (B, L, D/2, 2); computed in float32."""
    b, h, l, d = x.shape
    if table.shape[-3:] != (l, d // 2, 2):
        raise ValueError(f"rope table shape {tuple(table.shape)} does not fit x {tuple(x.shape)}; need (..., {l}, {d // 2}, 2)")
    t = table.to(device=x.device, dtype=torch.float32)
    t = t[:, None] if t.dim() == 4 else t[None, None]  # (B|1, 1, L, D/2, 2)
    xs = x.float().reshape(b, h, l, d // 2, 2)
    x0, x1 = xs[..., 0], xs[..., 1]
    cos, sin = t[..., 0], t[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).type_as(x)
