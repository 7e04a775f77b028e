"""1D ViT image tokenizer (TiTok / EOSTok / AliTok style).

Encoder: patch embedding + positions, learnable latent queries appended
([patches; prefix queries; latent queries]), a bidirectional ViT, keep the query
outputs -> linear to ``latent_dim`` -> quantizer. The code sequence is
``num_prefix_tokens + num_latent_tokens`` long (prefix first).

Decoder (pixels, images in [-1, 1] space), two layouts (``decoder_layout``):
- "mask_tokens" (ours, TiTok's): one mask token per patch + projected quantized latents (+ buffer
  tokens), a ViT, a linear head to patch pixels read off the mask tokens (N + L tokens).
- "latents" (AliTok's official decoder, train_tokenizer/model/vae_stage{1,2}.py): a plain
  transformer over [lead tokens; projected latents] whose output at latent i is patch i (needs
  L == N): no mask tokens, so about half the sequence (274 tokens at 256 px with 17 prefix tokens,
  against 529 with mask tokens). Lead tokens: the one class token of the causal stage 1, or the
  ``num_buffer_tokens`` buffer tokens of the bidirectional stage 2 (the official ``class_embedding``).
  The pixel head is the official one: linear to patch pixels, a 1x1 colour mix (its ``conv_out``)
  and a sigmoid to [0, 1], returned as 2 s - 1.

AliTok stage semantics (``decoder_causal``):
- causal (stage 1): prefix latents are fed to the decoder; latent j attends to
  latents <= j (prefix first); patch i (raster order) attends to all prefix
  latents, to the first ceil((i+1) * L / N) image latents (= latents 0..i when
  L == N patches) and to patches <= i. So patch i depends only on Quant(z_1..i)
  and the prefix: {p_k}_{k<=i} = Dec({Quant(z_k)}_{k<=i}). An aux head decodes
  the last ``grid`` prefix tokens to the first patch row (``prefix_row``).
  Buffer tokens are not used. With the "latents" layout the mask is the plain causal one over
  [class token; prefix; latents] (the official ``is_causal=True``): latent i's output, patch i,
  sees the prefix and latents 0..i.
- bidirectional (stage 2 / EOSTok): full attention; ``num_buffer_tokens`` learnable buffer tokens
  are added; the prefix latents are dropped ("prefix tokens are removed", the paper) unless
  ``decoder_reads_prefix`` (the official code's stage 2 and released tokenizer keep them as input).

``token_mix`` (off in every paper preset; on in the CPU demo's tiny preset): linear token-mixing
shortcuts. The encoder's latent queries get a learned linear mix of all patch tokens added
(query_j += sum_i A_ji patch_i) and the decoder's mask tokens a learned linear mix of the embedded
latents (mask_i += sum_j B_ij embed(z_j)); A and B are dense (no 2D order is imposed on the
latents). Without them every bit of image content must cross two attention hops (patches ->
latent queries, latents -> mask tokens) whose routing is learned from a symmetric start; a small
ViT stays for thousands of steps at the plateau where the latents carry only the mean colour
(about PCA-3 quality). The shortcuts give content an O(1) linear path from the first step and
leave the attention to refine it. With a causal decoder B is masked as the attention is: mask
token i mixes only the prefix and the latents patch i may see (``causal_decoder_mask``).
Switch stages with ``dataclasses.replace(cfg, decoder_causal=False)``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from system.models.artifacts import FrozenTokenizer, config_from_dict
from system.models.attention import BACKENDS
from system.models.blocks import SelfAttention
from system.models.quantizers import QuantizerConfig, QuantizerOutput, build_quantizer

DECODER_LAYOUTS = ("mask_tokens", "latents")


@dataclass
class Tokenizer1DConfig:
    image_size: int = 256
    patch_size: int = 16
    enc_width: int = 768
    enc_depth: int = 12
    enc_heads: int = 12
    dec_width: int = 768
    dec_depth: int = 12
    dec_heads: int = 12
    mlp_ratio: float = 4.0
    num_latent_tokens: int = 256
    latent_dim: int = 64  # code dim; must equal quantizer.dim
    quantizer: QuantizerConfig = field(default_factory=lambda: QuantizerConfig(type="ibq", codebook_size=4096, dim=64))
    decoder_causal: bool = False
    num_prefix_tokens: int = 0
    num_buffer_tokens: int = 0
    token_mix: bool = False  # linear token-mixing shortcuts patches -> latents -> patches (see module doc)
    # "mask_tokens": ours (one mask token per patch); "latents": AliTok's official decoder (latent i -> patch i)
    decoder_layout: str = "mask_tokens"
    decoder_reads_prefix: bool = False  # a bidirectional decoder reads the prefix codes too (AliTok's code); causal always does
    proj_bias: bool = False  # bias on each attention output projection (AliTok's code: encoder and decoder)
    attn_backend: str = "auto"
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        for name in ("enc", "dec"):
            w, h = getattr(self, f"{name}_width"), getattr(self, f"{name}_heads")
            if w % h:
                raise ValueError(f"{name}_width {w} is not divisible by {name}_heads {h}")
        if isinstance(self.quantizer, QuantizerConfig) and self.quantizer.dim != self.latent_dim:
            raise ValueError(
                f"latent_dim {self.latent_dim} != quantizer.dim {self.quantizer.dim}; set both to the code dim"
            )
        if self.num_latent_tokens < 1 or self.num_prefix_tokens < 0 or self.num_buffer_tokens < 0:
            raise ValueError("num_latent_tokens must be >= 1 and prefix/buffer token counts >= 0")
        if self.decoder_causal and 0 < self.num_prefix_tokens < self.grid:
            raise ValueError(
                f"a causal decoder decodes the first patch row from the prefix tokens: num_prefix_tokens "
                f"must be 0 or >= grid width {self.grid}; got {self.num_prefix_tokens}"
            )
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend {self.attn_backend!r} unknown; expected one of {BACKENDS}")
        if self.decoder_layout not in DECODER_LAYOUTS:
            raise ValueError(f"decoder_layout {self.decoder_layout!r} unknown; expected one of {DECODER_LAYOUTS}")
        if self.decoder_layout == "latents" and self.num_latent_tokens != self.num_patches:
            raise ValueError(f"decoder_layout 'latents' decodes latent i to patch i: num_latent_tokens must be the "
                             f"{self.num_patches} patches, got {self.num_latent_tokens} (or use decoder_layout 'mask_tokens')")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def seq_len(self) -> int:
        """Length of the code sequence (prefix + latent tokens)."""
        return self.num_prefix_tokens + self.num_latent_tokens

    @property
    def unread_prefix(self) -> int:
        """Leading codes the decoder does not read: the prefix of a bidirectional decoder that drops it."""
        return 0 if self.decoder_causal or self.decoder_reads_prefix else self.num_prefix_tokens

    @property
    def num_lead_tokens(self) -> int:
        """Tokens before the latents in the decoder: buffer tokens (bidirectional), and with the "latents"
        layout the one class token of the causal decoder."""
        if self.decoder_causal:
            return 1 if self.decoder_layout == "latents" else 0
        return self.num_buffer_tokens


class DecoderOutput(NamedTuple):  # NamedTuples: DeepSpeed ZeRO-3 hooks see the tensors inside
    image: Tensor  # (B, 3, H, W)
    hidden: Optional[Tensor] = None  # (B, N, dec_width) patch (mask-token) states after the chosen layer
    prefix_row: Optional[Tensor] = None  # (B, 3, patch, W) first patch row from the prefix tokens (causal)
    # (B, 3, patch, k * patch): the first k = P - grid prefix tokens decoded to the first k patches of
    # row 0 (AliTok's code: 17 prefix tokens decode "first patch + first row"); None when P == grid
    prefix_lead: Optional[Tensor] = None


class TokenizerOutput(NamedTuple):
    image: Tensor  # (B, 3, H, W) reconstruction
    quant: QuantizerOutput  # codes (B, P+L), quantized (B, P+L, D), losses
    enc_hidden: Tensor  # (B, N, enc_width) encoder 2D hidden patch embeddings
    dec_hidden: Optional[Tensor] = None  # (B, N, dec_width)
    prefix_row: Optional[Tensor] = None  # (B, 3, patch, W)


class ViTBlock(nn.Module):
    """Pre-LN ViT block: x + attn(LN(x)); x + MLP_GELU(LN(x)). Attention via blocks.SelfAttention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, backend: str = "auto", proj_bias: bool = False):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, qkv_bias=True, backend=backend, proj_bias=proj_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # (B, S, D) -> (B, S, D)
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


def _layer_index(layer: int | None, depth: int, who: str) -> int | None:
    """Python-style block index (-1 = last) -> 0-based index, validated."""
    if layer is None:
        return None
    if not -depth <= layer < depth:
        raise ValueError(f"{who} hidden layer {layer} out of range for depth {depth} (use 0..{depth - 1} or -1)")
    return layer % depth


class _ViT(nn.Module):
    """ln_pre -> blocks -> ln_post, optionally returning the output of one block."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, backend: str, grad_ckpt: bool,
                 proj_bias: bool = False):
        super().__init__()
        self.ln_pre = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList([ViTBlock(dim, heads, mlp_ratio, backend, proj_bias) for _ in range(depth)])
        self.ln_post = nn.LayerNorm(dim)
        self.grad_ckpt = grad_ckpt

    def forward(self, x: Tensor, mask: Tensor | None = None, keep: int | None = None) -> tuple[Tensor, Tensor | None]:
        x, kept = self.ln_pre(x), None
        for i, blk in enumerate(self.blocks):
            if self.grad_ckpt and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
            if i == keep:
                kept = x
        return self.ln_post(x), kept


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=0.02))


class Encoder1D(nn.Module):
    """Images (B, 3, H, W) -> (latents (B, P+L, latent_dim), hidden patch states)."""

    def __init__(self, cfg: Tokenizer1DConfig):
        super().__init__()
        w = cfg.enc_width
        self.patch_embed = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = _param(1, cfg.num_patches, w)
        self.latent_tokens = _param(cfg.seq_len, w)  # prefix queries first, then latent queries
        self.vit = _ViT(w, cfg.enc_depth, cfg.enc_heads, cfg.mlp_ratio, cfg.attn_backend, cfg.grad_checkpointing,
                        cfg.proj_bias)
        self.to_latent = nn.Linear(w, cfg.latent_dim)
        # token_mix: latent query j += sum_i latent_mix[j, i] * patch token i (variance-preserving init)
        self.latent_mix = nn.Parameter(torch.randn(cfg.seq_len, cfg.num_patches) / cfg.num_patches**0.5) if cfg.token_mix else None
        self.cfg = cfg

    def forward(self, img: Tensor, hidden_layer: int = -1) -> tuple[Tensor, Tensor]:
        """-> z (B, P+L, latent_dim), hidden patches (B, N, enc_width) after block ``hidden_layer``."""
        c = self.cfg
        if img.dim() != 4 or img.shape[1:] != (3, c.image_size, c.image_size):
            raise ValueError(f"expected images (B, 3, {c.image_size}, {c.image_size}); got {tuple(img.shape)}")
        x = self.patch_embed(img).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, W)
        q = self.latent_tokens.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
        if self.latent_mix is not None:
            q = q + torch.einsum("ln,bnw->blw", self.latent_mix.to(x.dtype), x)
        keep = _layer_index(int(hidden_layer), c.enc_depth, "encoder")
        out, hidden = self.vit(torch.cat([x, q], dim=1), keep=keep)  # (B, N + P + L, W)
        return self.to_latent(out[:, c.num_patches :]), hidden[:, : c.num_patches]


def causal_decoder_mask(num_prefix: int, num_latent: int, num_patches: int) -> Tensor:
    """Bool (S, S) mask, True = may attend, over [prefix; latents; patches] (S = P + L + N)."""
    t = num_prefix + num_latent
    s = t + num_patches
    allowed = torch.zeros(s, s, dtype=torch.bool)
    lat = torch.arange(t)
    allowed[:t, :t] = lat[None, :] <= lat[:, None]
    i = torch.arange(num_patches)
    visible = num_prefix + ((i + 1) * num_latent + num_patches - 1) // num_patches  # P + ceil((i+1) L / N)
    allowed[t:, :t] = lat[None, :] < visible[:, None]
    allowed[t:, t:] = i[None, :] <= i[:, None]
    return allowed


def _official_rgb(pix: Tensor, rgb: Optional[nn.Linear]) -> Tensor:
    """AliTok's official pixel head after its linear map (with `rgb`): a 1x1 colour mix of each pixel
    (its `conv_out`) and a sigmoid to [0, 1], returned as 2 s - 1 (our [-1, 1] image space).
    pix (B, n, p*p*3) in (p1, p2, c) order."""
    if rgb is None:
        return pix
    return torch.sigmoid(rgb(pix.unflatten(-1, (-1, 3))).flatten(-2)) * 2 - 1


class Decoder1D(nn.Module):
    """Quantized latents (B, P+L, latent_dim) -> DecoderOutput (layouts and attention: module doc)."""

    def __init__(self, cfg: Tokenizer1DConfig):
        super().__init__()
        w = cfg.dec_width
        self.cfg = cfg
        self.n_in = cfg.num_latent_tokens + cfg.num_prefix_tokens - cfg.unread_prefix
        self.n_lead = cfg.num_lead_tokens
        official = cfg.decoder_layout == "latents"
        self.embed = nn.Linear(cfg.latent_dim, w)
        self.latent_pos = _param(1, self.n_in, w)
        # mask tokens: one per patch ("mask_tokens" layout only)
        self.mask_token = None if official else _param(1, 1, w)
        self.patch_pos = None if official else _param(1, cfg.num_patches, w)
        # lead tokens: the buffer tokens, or the official causal decoder's class token
        self.buffer_tokens = _param(self.n_lead, w) if self.n_lead else None
        self.vit = _ViT(w, cfg.dec_depth, cfg.dec_heads, cfg.mlp_ratio, cfg.attn_backend, cfg.grad_checkpointing,
                        cfg.proj_bias)
        pix = 3 * cfg.patch_size**2
        self.to_pixels = nn.Linear(w, pix)
        self.to_rgb = nn.Linear(3, 3) if official else None  # official head: colour mix + sigmoid (_official_rgb)
        aux = cfg.decoder_causal and cfg.num_prefix_tokens > 0
        self.prefix_head = nn.Linear(w, pix) if aux else None
        self.prefix_rgb = nn.Linear(3, 3) if aux and official else None
        mask = None
        if cfg.decoder_causal:
            s = self.n_lead + self.n_in
            mask = (torch.ones(s, s, dtype=torch.bool).tril() if official else
                    causal_decoder_mask(cfg.num_prefix_tokens, cfg.num_latent_tokens, cfg.num_patches))
        self.register_buffer("attn_mask", mask, persistent=False)
        # token_mix: mask token i += sum_j patch_mix[i, j] * embed(z_j) over the latents patch i may see
        # (all, or the causal mask's; variance-preserving init); no mask tokens in the "latents" layout
        mix = cfg.token_mix and not official
        seen = torch.ones(cfg.num_patches, self.n_in) if mask is None or official else mask[-cfg.num_patches:, : self.n_in].float()
        self.register_buffer("mix_mask", seen if mix and mask is not None else None, persistent=False)
        self.patch_mix = nn.Parameter(torch.randn(seen.shape) * seen / seen.sum(1, keepdim=True).sqrt()) if mix else None

    def _unpatchify(self, x: Tensor, rows: int) -> Tensor:
        """(B, rows*grid, 3*p*p) -> (B, 3, rows*p, grid*p)."""
        p, g = self.cfg.patch_size, self.cfg.grid
        x = x.reshape(x.shape[0], rows, g, p, p, 3)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], 3, rows * p, g * p)

    def forward(self, zq: Tensor, hidden_layer: int | None = None) -> DecoderOutput:
        c = self.cfg
        if zq.dim() != 3 or zq.shape[1:] != (c.seq_len, c.latent_dim):
            raise ValueError(
                f"decoder expects quantized latents (B, {c.seq_len}, {c.latent_dim}) "
                f"(prefix {c.num_prefix_tokens} + latent {c.num_latent_tokens} tokens); got {tuple(zq.shape)}"
            )
        b = zq.shape[0]
        emb = self.embed(zq[:, c.unread_prefix:])
        lat = emb + self.latent_pos  # (B, n_in, W)
        parts = [lat]
        if self.mask_token is not None:
            patches = (self.mask_token + self.patch_pos).expand(b, -1, -1).to(lat.dtype)  # (B, N, W)
            if self.patch_mix is not None:
                mix = self.patch_mix if self.mix_mask is None else self.patch_mix * self.mix_mask
                patches = patches + torch.einsum("nl,blw->bnw", mix.to(emb.dtype), emb)
            parts.append(patches)
        if self.buffer_tokens is not None:
            parts.insert(0, self.buffer_tokens.unsqueeze(0).expand(b, -1, -1).to(lat.dtype))
        x = torch.cat(parts, dim=1)
        keep = _layer_index(hidden_layer, c.dec_depth, "decoder")
        out, hidden = self.vit(x, mask=self.attn_mask, keep=keep)
        n = c.num_patches  # the last n outputs: the mask tokens, or the latents (latent i -> patch i)
        image = self._unpatchify(_official_rgb(self.to_pixels(out[:, -n:]), self.to_rgb), c.grid)
        prefix_row = prefix_lead = None
        if self.prefix_head is not None:  # the prefix latents' outputs (after the lead tokens)
            first = self.n_lead
            pre = out[:, first + c.num_prefix_tokens - c.grid : first + c.num_prefix_tokens]  # last `grid` prefix tokens
            prefix_row = self._unpatchify(_official_rgb(self.prefix_head(pre), self.prefix_rgb), 1)
            lead = c.num_prefix_tokens - c.grid
            if lead:  # the leading prefix tokens -> the first `lead` patches of row 0
                pix = _official_rgb(self.prefix_head(out[:, first:first + lead]), self.prefix_rgb)
                pix = pix.reshape(b, 1, lead, c.patch_size, c.patch_size, 3)
                prefix_lead = pix.permute(0, 5, 1, 3, 2, 4).reshape(b, 3, c.patch_size, lead * c.patch_size)
        return DecoderOutput(image=image, hidden=None if hidden is None else hidden[:, -n:], prefix_row=prefix_row,
                             prefix_lead=prefix_lead)


class Tokenizer1D(nn.Module):
    """Encoder1D -> quantizer -> Decoder1D."""

    def __init__(self, cfg: Tokenizer1DConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder1D(cfg)
        self.quantizer = build_quantizer(cfg.quantizer)
        self.decoder = Decoder1D(cfg)
        for m in (self.encoder, self.decoder):
            m.apply(_init_weights)

    @property
    def codebook(self) -> Tensor:
        """(K, D) code vectors (for the AR model's differentiable embedding probs @ codebook)."""
        return self.quantizer.codebook

    def encode(self, images: Tensor, hidden_layer: int = -1) -> tuple[QuantizerOutput, Tensor]:
        """images (B, 3, H, W) in [-1, 1] -> (QuantizerOutput over (B, P+L), hidden patches (B, N, enc_width))."""
        z, hidden = self.encoder(images, hidden_layer)
        return self.quantizer(z), hidden

    def decode_full(self, zq: Tensor, hidden_layer: int | None = None) -> DecoderOutput:
        """zq (B, P+L, D) -> DecoderOutput (image, decoder hidden patch states, prefix row)."""
        return self.decoder(zq, hidden_layer)

    def decode(self, zq: Tensor) -> Tensor:
        """zq (B, P+L, D) -> images (B, 3, H, W)."""
        return self.decoder(zq).image

    def decode_codes(self, codes: Tensor) -> Tensor:
        """codes (B, P+L) -> images (B, 3, H, W)."""
        zq = self.quantizer.embed_codes(codes).to(self.decoder.embed.weight.dtype)
        return self.decode(zq)

    def inference_state(self) -> tuple[Tokenizer1DConfig, dict[str, Tensor]]:
        """(config, state dict) to export: a VQ's re-initialisation state folded into its codebook and
        dropped (``VectorQuantizer.inference_state``), so the export loads as a plain tokenizer."""
        sd = dict(self.state_dict())
        fold = getattr(self.quantizer, "inference_state", None)
        if fold is None:
            return self.cfg, sd
        qcfg, qsd = fold("quantizer.")
        sd = {k: v for k, v in sd.items() if not k.startswith("quantizer.")} | qsd
        return dataclasses.replace(self.cfg, quantizer=qcfg), sd

    def forward(self, images: Tensor, enc_hidden_layer: int = -1, dec_hidden_layer: int | None = None) -> TokenizerOutput:
        """images (B, 3, H, W) -> TokenizerOutput (reconstruction, quantizer output, alignment hooks)."""
        quant, enc_hidden = self.encode(images, enc_hidden_layer)
        dec = self.decode_full(quant.quantized, dec_hidden_layer)
        return TokenizerOutput(dec.image, quant, enc_hidden, dec.hidden, dec.prefix_row)


def new_decoder(cfg: Tokenizer1DConfig) -> Decoder1D:
    """A decoder of `cfg` initialised as Tokenizer1D initialises its own (AliTok stage 2 trains a
    new decoder on a frozen encoder and quantizer)."""
    dec = Decoder1D(cfg)
    dec.apply(_init_weights)
    return dec


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _ibq(k: int, d: int) -> QuantizerConfig:
    # EOSTok reimplementation weights (unverified): commitment 1e-3, entropy 0.01; IBQ's own beta 0.25
    return QuantizerConfig(type="ibq", codebook_size=k, dim=d, double_weight=1.0, commit_weight=1e-3,
                           codebook_weight=0.25, entropy_weight=0.01, entropy_temperature=0.01)


def _alitok(prefix: int, buffer: int, reads_prefix: bool) -> Tokenizer1DConfig:
    # the official "clustering" VQ (train_tokenizer/model/vae_stage1.py): usage EMA 0.99, codes pulled to features;
    # the official decoder layout (latent i -> patch i, vae_stage1.py Decoder) and attention output biases
    vq = QuantizerConfig(type="vq", codebook_size=4096, dim=32, commit_weight=0.25, codebook_weight=1.0, cluster_decay=0.99)
    return Tokenizer1DConfig(
        enc_width=768, enc_depth=12, enc_heads=12, dec_width=1024, dec_depth=24, dec_heads=16,
        num_latent_tokens=256, latent_dim=32, quantizer=vq, decoder_causal=True, decoder_layout="latents",
        num_prefix_tokens=prefix, num_buffer_tokens=buffer, decoder_reads_prefix=reads_prefix, proj_bias=True,
    )


def _debug_tiny(causal: bool, layout: str = "mask_tokens") -> Tokenizer1DConfig:
    q = (QuantizerConfig(type="vq", codebook_size=64, dim=16, cluster_decay=0.99) if causal
         else QuantizerConfig(type="ibq", codebook_size=64, dim=16, entropy_weight=0.01))
    official = layout == "latents"
    return Tokenizer1DConfig(
        image_size=32, patch_size=8, enc_width=64, enc_depth=2, enc_heads=4, dec_width=64, dec_depth=2, dec_heads=4,
        num_latent_tokens=16, latent_dim=16, quantizer=q, decoder_causal=causal, decoder_layout=layout,
        num_prefix_tokens=(5 if official else 4) if causal else 0, num_buffer_tokens=4 if causal else 0,
        decoder_reads_prefix=official, proj_bias=official,
    )


TOKENIZER_PRESETS: dict[str, Tokenizer1DConfig] = {
    "eostok-tok": Tokenizer1DConfig(quantizer=_ibq(4096, 64)),
    "eostok-tok-h": Tokenizer1DConfig(enc_width=1024, enc_depth=16, enc_heads=16, dec_width=1024, dec_depth=16,
                                      dec_heads=16, quantizer=_ibq(4096, 64)),
    # AliTok: the paper's (16 prefix tokens; stage 2: 64 buffer tokens, the prefix removed) and the released
    # code's (17 = first patch + first row, image_seq_len 273; stage 2: 32 buffer tokens, the prefix kept)
    "alitok-tok-paper": _alitok(prefix=16, buffer=64, reads_prefix=False),
    "alitok-tok-code": _alitok(prefix=17, buffer=32, reads_prefix=True),
    "debug-tiny": _debug_tiny(causal=False),
    "debug-tiny-causal": _debug_tiny(causal=True),  # our mask-token decoder
    "debug-tiny-alitok": _debug_tiny(causal=True, layout="latents"),  # the official layout, 1 + 4 prefix tokens
}


def tokenizer_config(name: str) -> Tokenizer1DConfig:
    """A fresh copy of a named preset."""
    if name not in TOKENIZER_PRESETS:
        raise KeyError(f"unknown tokenizer preset {name!r}; known: {sorted(TOKENIZER_PRESETS)}")
    return copy.deepcopy(TOKENIZER_PRESETS[name])


# ---------------------------------------------------------------------------- the frozen adapter
def tokenizer1d_config(config: dict) -> Tokenizer1DConfig:
    """The Tokenizer1DConfig of a tokenizer1d part's model.json config."""
    cfg = dict(config)
    cfg["quantizer"] = config_from_dict(QuantizerConfig, cfg["quantizer"], "tokenizer1d quantizer")
    return config_from_dict(Tokenizer1DConfig, cfg, "tokenizer1d")


def build_tokenizer1d(config: dict, state_dict: Optional[dict[str, Tensor]]) -> Tokenizer1D:
    """Our Tokenizer1D with its weights (trainable, eval mode); `state_dict` None: the architecture only (plan mode)."""
    model = Tokenizer1D(tokenizer1d_config(config))
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


class Tokenizer1DFrozen(FrozenTokenizer):
    """Our 1D tokenizer (kind "tokenizer1d": EOSTok, AliTok); its codebook feeds the AR input embedding."""

    kind = "tokenizer1d"
    wraps = Tokenizer1D
    model: Tokenizer1D

    @classmethod
    def from_export(cls, config: dict, state_dict: Optional[dict[str, Tensor]]) -> "Tokenizer1DFrozen":
        return cls(build_tokenizer1d(config, state_dict))

    @property
    def codebook(self) -> Tensor:
        return self.model.codebook  # (V, D)

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.quantizer.num_codes

    @property
    def image_size(self) -> int:
        return self.model.cfg.image_size

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        quant, _ = self.model.encode(images)
        return quant.codes  # (B, P+L)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        return self.model.decode_codes(codes)  # (B, 3, H, W)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        return self.model(images).image

    @property
    def prefix_tokens(self) -> int:
        return self.model.cfg.num_prefix_tokens

    @property
    def unread_prefix(self) -> int:
        return self.model.cfg.unread_prefix

    def num_tokens(self, resolution: int) -> int:
        if resolution != self.image_size:
            raise ValueError(f"this 1D tokenizer works at {self.image_size} px, not {resolution}; "
                             f"set data.resolution={self.image_size}")
        return self.model.cfg.seq_len

    def image_size_for(self, num_tokens: int) -> int:
        if num_tokens != self.model.cfg.seq_len:
            raise ValueError(f"this 1D tokenizer gives {self.model.cfg.seq_len} codes per image, not {num_tokens}")
        return self.image_size
