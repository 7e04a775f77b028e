"""Representation alignment losses against a frozen vision teacher.

- ``ImplicitAlignLoss`` (EOSTok): project the encoder's 2D hidden patch tokens to the teacher
  dim and maximise per-patch cosine similarity: L = -1/N sum_n cos(h(h_enc[n]), y[n]).
- ``DirectAlignLoss`` (EOSTok's "direct alignment" ablation): the same on the 1D latents z,
  latent i against teacher patch i in raster order (the teacher pooled to L tokens if L != N).
- ``DecoderAlignLoss`` (REPA-style, EOSTok decoder): same on a decoder layer's mask-token states.
- ``SemanticDistillLoss`` (SemTok 2D branch): MSE between projected patch tokens and teacher features.
- ``SemanticContrastiveLoss`` (SemTok 1D branch): InfoNCE between pooled projected 1D tokens and
  pooled teacher features over the batch; with `gather` (the method's all-gather over ranks) the
  negatives are the teacher features of the global batch.
Each loss owns its projector. Teacher features are treated as constants (detached).
When the student and teacher patch grids differ, the projected student grid is resized
(bilinear) to the teacher's grid so the targets are never resampled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

Grid = tuple[int, int]


def mlp_projector(in_dim: int, out_dim: int, hidden_dim: int = 2048, depth: int = 3) -> nn.Module:
    """REPA-style MLP: depth 0 = identity (in_dim must equal out_dim), 1 = linear, >=2 = SiLU MLP."""
    if depth == 0:
        if in_dim != out_dim:
            raise ValueError(f"identity projector (depth=0) needs in_dim == out_dim; got {in_dim} and {out_dim}")
        return nn.Identity()
    if depth < 0:
        raise ValueError(f"projector depth={depth}; expected >= 0")
    dims = [in_dim] + [hidden_dim] * (depth - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < depth - 1:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def infer_grid(n: int, grid: Grid | None = None, name: str = "tokens") -> Grid:
    """Return ``grid`` after checking h*w == n, or the square grid of n tokens."""
    if grid is not None:
        if grid[0] * grid[1] != n:
            raise ValueError(f"{name}: grid {grid} has {grid[0] * grid[1]} cells but there are {n} tokens")
        return grid
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{name}: {n} tokens is not a square grid; pass the (h, w) grid explicitly")
    return side, side


def match_grid(x: torch.Tensor, src: Grid, dst: Grid) -> torch.Tensor:
    """Resize patch tokens (B, h*w, C) laid out on ``src`` to ``dst``: -> (B, H*W, C)."""
    if src == dst:
        return x
    b, _, c = x.shape
    # float32 at least: antialiased resize has no half-precision CPU kernel, and the loss is fp32 anyway
    img = x.transpose(1, 2).reshape(b, c, src[0], src[1]).to(torch.promote_types(x.dtype, torch.float32))
    shrink = dst[0] < src[0] or dst[1] < src[1]
    img = F.interpolate(img, size=dst, mode="bilinear", align_corners=False, antialias=shrink)
    return img.reshape(b, c, dst[0] * dst[1]).transpose(1, 2)


def _common_float(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast both to float32 (or float64 if either is double) for a stable loss computation."""
    dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dt), b.to(dt)


@dataclass
class AlignConfig:
    in_dim: int  # student hidden width
    teacher_dim: int  # teacher feature width (768 for DINOv2-B, 1152 for SigLIP-so400m)
    hidden_dim: int = 2048
    depth: int = 3  # projector depth; 0 = identity


class CosineAlignLoss(nn.Module):
    """-mean cosine(proj(student patch), teacher patch). Shared by implicit and REPA alignment."""

    def __init__(self, cfg: AlignConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = mlp_projector(cfg.in_dim, cfg.teacher_dim, cfg.hidden_dim, cfg.depth)

    def forward(
        self,
        hidden: torch.Tensor,  # (B, N, in_dim) student patch tokens
        teacher: torch.Tensor,  # (B, M, teacher_dim) teacher patch features
        grid: Grid | None = None,
        teacher_grid: Grid | None = None,
    ) -> torch.Tensor:  # scalar in [-1, 1]
        if hidden.dim() != 3 or teacher.dim() != 3 or hidden.shape[0] != teacher.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: expected hidden (B,N,C) and teacher (B,M,D); "
                f"got {tuple(hidden.shape)} and {tuple(teacher.shape)}"
            )
        if teacher.shape[-1] != self.cfg.teacher_dim:
            raise ValueError(f"{type(self).__name__}: teacher dim {teacher.shape[-1]} != cfg.teacher_dim {self.cfg.teacher_dim}")
        z = self.proj(hidden)
        z = match_grid(z, infer_grid(z.shape[1], grid, "student"), infer_grid(teacher.shape[1], teacher_grid, "teacher"))
        z, t = _common_float(z, teacher.detach())
        cos = F.cosine_similarity(z, t, dim=-1, eps=1e-6)  # (B, M)
        return -cos.mean()


class ImplicitAlignLoss(CosineAlignLoss):
    """EOSTok implicit alignment on the encoder's 2D hidden patch embeddings (not the 1D latents)."""


class DirectAlignLoss(CosineAlignLoss):
    """EOSTok's direct alignment of the 1D latents z (B, L, in_dim) to the teacher's patch features
    (B, N, teacher_dim): latent i against teacher patch i in raster order, which is what pulls z
    into a raster-ordered patch sequence (the paper's failure case). With 256 latents and a 16x16
    teacher grid (DINOv2 at 224 px) the map is one-to-one; otherwise the teacher's raster
    sequence is average-pooled (or repeated) to L tokens: our choice, the paper gives no other."""

    def forward(self, latents: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:  # scalar in [-1, 1]
        n = latents.shape[1]
        if teacher.dim() == 3 and teacher.shape[1] != n:
            teacher = F.adaptive_avg_pool1d(teacher.detach().transpose(1, 2), n).transpose(1, 2)
        return super().forward(latents, teacher, grid=(1, n), teacher_grid=(1, n))


class DecoderAlignLoss(CosineAlignLoss):
    """REPA-style alignment of a decoder layer's hidden mask-token states to teacher features."""


class SemanticDistillLoss(nn.Module):
    """SemTok 2D-branch distillation: mean squared error ||x_sig - w_x(x)||^2 per element."""

    def __init__(self, cfg: AlignConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = mlp_projector(cfg.in_dim, cfg.teacher_dim, cfg.hidden_dim, cfg.depth)

    def forward(
        self,
        hidden: torch.Tensor,  # (B, N, in_dim) 2D-branch tokens
        teacher: torch.Tensor,  # (B, M, teacher_dim)
        grid: Grid | None = None,
        teacher_grid: Grid | None = None,
    ) -> torch.Tensor:
        z = self.proj(hidden)
        if z.shape[-1] != teacher.shape[-1]:
            raise ValueError(f"SemanticDistillLoss: projected dim {z.shape[-1]} != teacher dim {teacher.shape[-1]}")
        z = match_grid(z, infer_grid(z.shape[1], grid, "student"), infer_grid(teacher.shape[1], teacher_grid, "teacher"))
        return F.mse_loss(*_common_float(z, teacher.detach()))


@dataclass
class ContrastiveConfig:
    token_dim: int  # width of the (quantized) 1D tokens
    teacher_dim: int
    hidden_dim: int = 2048
    depth: int = 1  # projector w_z depth; 0 = identity
    temperature: float = 0.07  # logits = v.u / temperature (the paper's t is 1/temperature)


class SemanticContrastiveLoss(nn.Module):
    """SemTok 1D-branch InfoNCE: v = norm(mean_k w_z(z_k)), u = norm(mean_n x_sig[n]);
    L = -mean_i log softmax_j(v_i . u_j / T)[i]. Returns (loss, top-1 retrieval accuracy).

    Across ranks, `gather` (every rank's tensor concatenated in rank order, e.g.
    Collective.all_gather) and `rank` give each local v_i the u of the whole global batch as
    negatives, its own at rank * B + i; the mean of the ranks' losses (and of their gradients, as
    data-parallel training averages them) equals the loss on the concatenated batch, as u carries
    no gradient."""

    def __init__(self, cfg: ContrastiveConfig) -> None:
        super().__init__()
        if cfg.temperature <= 0:
            raise ValueError(f"ContrastiveConfig.temperature={cfg.temperature}; expected > 0")
        self.cfg = cfg
        self.proj = mlp_projector(cfg.token_dim, cfg.teacher_dim, cfg.hidden_dim, cfg.depth)

    def forward(
        self,
        tokens: torch.Tensor,  # (B, K, token_dim) quantized 1D tokens
        teacher: torch.Tensor,  # (B, M, teacher_dim) teacher patch features
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        rank: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.shape[0] != teacher.shape[0]:
            raise ValueError(f"SemanticContrastiveLoss: batch {tokens.shape[0]} != teacher batch {teacher.shape[0]}")
        v, u = _common_float(self.proj(tokens), teacher.detach())
        v = F.normalize(v.mean(dim=1), dim=-1, eps=1e-6)  # (B, D)
        u = F.normalize(u.mean(dim=1), dim=-1, eps=1e-6)  # (B, D)
        if gather is not None:
            u = gather(u.contiguous())  # (W B, D): the global batch's, rank-major
        logits = v @ u.t() / self.cfg.temperature  # (B, W B)
        labels = rank * v.shape[0] + torch.arange(v.shape[0], device=logits.device)
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            acc = (logits.argmax(dim=-1) == labels).float().mean()
        return loss, acc
