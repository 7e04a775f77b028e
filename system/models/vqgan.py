"""2D VQGAN (taming / LlamaGen layout) for LlamaGen's public VQ-16 tokenizer.

Module names follow LlamaGen's ``tokenizer/tokenizer_image/vq_model.py`` so its
checkpoints load with strict=True through ``system.models.adapters_vq``. The
default ``VQGANConfig`` is the public VQ-16: codebook 16384 x 8 (L2-normalised),
ch 128, ch_mult (1, 1, 2, 2, 4), z_channels 256, 2 res blocks per level.
Images are in [-1, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from system.models.quantizers import QuantizerConfig, QuantizerOutput, VectorQuantizer

NORM_GROUPS = 32


@dataclass
class VQGANConfig:
    codebook_size: int = 16384
    codebook_dim: int = 8
    codebook_l2_norm: bool = True
    commit_beta: float = 0.25
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    num_res_blocks: int = 2
    dropout: float = 0.0
    in_channels: int = 3

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % NORM_GROUPS]
        if bad or self.z_channels % NORM_GROUPS:
            raise ValueError(
                f"VQGAN channel counts must be multiples of {NORM_GROUPS} (GroupNorm groups); "
                f"got ch={self.ch}, ch_mult={self.ch_mult}, z_channels={self.z_channels}"
            )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv x2 with a 1x1 ``nin_shortcut`` when channels change."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 conv q/k/v/proj_out."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q, self.k, self.v = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (m(hn).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))  # (B,1,HW,C)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after asymmetric (right/bottom) zero padding."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(res: nn.ModuleList, attn: nn.ModuleList, resample: nn.Module | None, name: str) -> nn.Module:
    m = nn.Module()
    m.res, m.attn = res, attn
    if resample is not None:
        setattr(m, name, resample)
    return m


def _mid(ch: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(ch, ch, dropout), AttnBlock(ch), ResnetBlock(ch, ch, dropout)])


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> (B, z_channels, H/f, W/f); attention at the lowest resolution."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        c_in = ch
        for i in range(n):
            c_out = ch * mult[i]
            res, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                res.append(ResnetBlock(c_in, c_out, cfg.dropout))
                c_in = c_out
                if i == n - 1:
                    attn.append(AttnBlock(c_in))
            self.conv_blocks.append(_level(res, attn, Downsample(c_in) if i != n - 1 else None, "downsample"))
        self.mid = _mid(c_in, cfg.dropout)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for blk in self.conv_blocks:
            for j in range(self.num_res_blocks):
                h = blk.res[j](h)
                if len(blk.attn) > 0:
                    h = blk.attn[j](h)
            if hasattr(blk, "downsample"):
                h = blk.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> image (B, 3, h*f, w*f); levels run from the lowest resolution up."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        c_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _mid(c_in, cfg.dropout)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(n)):
            c_out = ch * mult[i]
            res, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                res.append(ResnetBlock(c_in, c_out, cfg.dropout))
                c_in = c_out
                if i == n - 1:
                    attn.append(AttnBlock(c_in))
            self.conv_blocks.append(_level(res, attn, Upsample(c_in) if i != 0 else None, "upsample"))
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.in_channels, 3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """Weight of the output conv (for the adaptive GAN weight)."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for blk in self.conv_blocks:
            for j in range(self.num_res_blocks + 1):
                h = blk.res[j](h)
                if len(blk.attn) > 0:
                    h = blk.attn[j](h)
            if hasattr(blk, "upsample"):
                h = blk.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQModel(nn.Module):
    """Encoder -> quant_conv -> VQ (L2-normalised codes) -> post_quant_conv -> Decoder."""

    def __init__(self, cfg: VQGANConfig | None = None):
        super().__init__()
        cfg = cfg or VQGANConfig()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(
            QuantizerConfig(
                type="vq", codebook_size=cfg.codebook_size, dim=cfg.codebook_dim,
                l2_norm=cfg.codebook_l2_norm, commit_weight=cfg.commit_beta, codebook_weight=1.0,
            )
        )
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)

    def quantize_latents(self, img: Tensor) -> tuple[QuantizerOutput, tuple[int, int]]:
        """img (B, 3, H, W) -> (QuantizerOutput over (B, h*w, D) in raster order, (h, w))."""
        if img.dim() != 4 or img.shape[1] != self.cfg.in_channels:
            raise ValueError(f"VQModel expects images (B, {self.cfg.in_channels}, H, W); got {tuple(img.shape)}")
        f = self.cfg.downsample
        if img.shape[-1] % f or img.shape[-2] % f:
            raise ValueError(f"image size {tuple(img.shape[-2:])} must be divisible by the downsampling {f}")
        z = self.quant_conv(self.encoder(img))  # (B, D, h, w)
        b, d, h, w = z.shape
        return self.quantize(z.flatten(2).transpose(1, 2)), (h, w)

    def encode(self, img: Tensor) -> Tensor:
        """img (B, 3, H, W) -> codes (B, H/f, W/f) int64."""
        out, (h, w) = self.quantize_latents(img)
        return out.codes.view(img.shape[0], h, w)

    def decode(self, quant: Tensor) -> Tensor:
        """quantized latents (B, D, h, w) -> image (B, 3, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_codes(self, codes: Tensor) -> Tensor:
        """codes (B, h, w), or (B, L) with L a perfect square -> image (B, 3, h*f, w*f)."""
        if codes.dim() == 2:
            side = math.isqrt(codes.shape[1])
            if side * side != codes.shape[1]:
                raise ValueError(f"codes (B, L) need a square L to form a grid; got L={codes.shape[1]}")
            codes = codes.view(codes.shape[0], side, side)
        if codes.dim() != 3:
            raise ValueError(f"decode_codes expects codes (B, h, w) or (B, L); got {tuple(codes.shape)}")
        q = self.quantize.embed_codes(codes).permute(0, 3, 1, 2)  # (B, D, h, w)
        return self.decode(q.to(self.post_quant_conv.weight.dtype))

    def forward(self, img: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """img (B, 3, H, W) -> (reconstruction (B, 3, H, W), QuantizerOutput)."""
        out, (h, w) = self.quantize_latents(img)
        q = out.quantized.transpose(1, 2).reshape(img.shape[0], -1, h, w)
        return self.decode(q), out
