"""SemTok's MMDiT encoder and decoder (../shared/seeds/semtok.txt, section 3.1 and appendix A.1).

Both are dual-stream MMDiT transformers (Esser et al., 2024): an image stream of 2x2 patches of
SD3.5-VAE latents and a stream of K 1D tokens, joined in every block by one attention over the
concatenated keys/values of both streams. Positions: 2D RoPE on the image stream (half of each
head's dims rotate with the patch row, half with the column) and 1D RoPE on the token stream (token
index), as appendix A.1 says for both the encoder and the decoder.

Built from diffusers where it has the part:
- `JointRoPEAttnProcessor` is diffusers' `JointAttnProcessor2_0` (same projections, qk-norm,
  concatenation order [image; tokens], `context_pre_only` handling, F.scaled_dot_product_attention)
  plus the rotation (diffusers' `apply_rotary_emb`, interleaved channel pairs as in Flux) of q/k
  after the qk-norm. The (cos, sin) tables reach it as the attention kwargs `image_rope` /
  `token_rope` (SD3Transformer2DModel passes `joint_attention_kwargs` to every block's `attn` and,
  in SD3.5's dual-attention blocks, to `attn2`, the image-only self-attention, which then gets the
  image table only). `Attention.forward` filters kwargs by the processor's `__call__` signature and
  warns about the rest, so both names are explicit parameters. Without tables it is exactly
  `JointAttnProcessor2_0` (tests check this).
- `rope_1d` / `rope_2d` build the tables with diffusers' `get_1d_rotary_pos_embed`; the layout
  (first half of the head dims: rows, second half: columns, frequencies of a half-width 1D RoPE)
  is the one of system/models/rope.py (LlamaGen), only as diffusers' (cos, sin) of shape (L, D)
  instead of a (L, D/2, 2) table. Tables are float32 and built per forward for the actual grid and
  K (a few tiny ops; no cache, so no stale tables across devices or inference mode).
- The encoder's blocks use diffusers' `Attention` and `FeedForward`; its patch embedding is
  diffusers' `PatchEmbed` without a position embedding (2D RoPE gives positions).
- The decoder *is* diffusers' `SD3Transformer2DModel` (`MMDiTDecoder.mmdit`, so SD3.5-Medium's
  transformer state dict keys load into it unchanged) with every processor replaced.

Where we differ from / fill in the paper:
- Encoder blocks have no AdaLN and no timestep (the encoder has none): per stream pre-LayerNorm ->
  joint attention -> residual, pre-LayerNorm -> GELU(tanh) MLP -> residual, in both streams in every
  block (the last block keeps the token stream too: it is the output). That is how 8 blocks of
  width 768 count the paper's 113M (113.7M here); SD3's AdaLN-zero blocks would count ~170M. Weights
  get DiT/SD3-style init (xavier-uniform linears, zero biases), the K token embeddings N(0, 0.02).
  Outputs: the token stream through a final LayerNorm + Linear(width, token_dim) (pre-quantisation,
  token_dim = BSQ bits) and the image stream through a final LayerNorm (for the semantic
  distillation projection).
- Decoder: SD3.5-Medium's transformer shape (24 blocks, 24 heads x 64, dual attention in blocks
  0..12, RMS qk-norm), initialised from its weights by `load_pretrained`. Our tokens are the
  context stream (`encoder_hidden_states`), so `context_embedder` is Linear(token_dim, 1536) instead
  of Linear(4096, 1536) (T5) and the pooled-text projection starts at token_dim instead of 2048
  (CLIP): those two weight matrices (`context_embedder.weight`,
  `time_text_embed.text_embedder.linear_1.weight`) cannot load and start fresh; their biases and
  the rest of the pooled projection have matching shapes and do load. The paper does not say what feeds SD3's
  pooled vector; we use the mean of the tokens. The timestep is t x 1000 (SD3's sigma x 1000; t = 1
  is pure noise). SD3's absolute sin-cos position embedding in its patch embedding stays (the
  SD3.5 weights expect it); the 2D/1D RoPE is added on top of it in every attention.
- Parameters: encoder 113,671,442 (paper 113M, +0.6%; 113.4M of it in the blocks); decoder
  2,233,789,632 at token_dim 18 (paper 2236M, -0.1%). SD3.5-Medium's own transformer counts
  2,243,171,520 (its T5/CLIP-width context_embedder and pooled projection add 9.4M) plus a 226M-entry
  non-learned pos_embed buffer (384^2 x 1536), which is where the usual "2.5B" comes from;
  `count_parameters` counts parameters only.
- The two streams' RoPE positions both start at 0 (patch row/column, token index); the paper gives
  no offsets. Scores within a stream depend on relative offsets only; across streams the rotation
  is a fixed position-dependent bias (the 1D and 2D tables differ in frequency layout).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from system.models import weights
from system.models.optional import require

require("diffusers")  # SemTok's extra: a clear error naming it when missing
from diffusers import SD3Transformer2DModel  # noqa: E402
from diffusers.models.attention import FeedForward  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402
from diffusers.models.embeddings import PatchEmbed, apply_rotary_emb, get_1d_rotary_pos_embed  # noqa: E402

RopeTable = tuple[Tensor, Tensor]  # (cos, sin), each (L, head_dim) float32

# keys of SD3's transformer whose shapes depend on the text encoders' widths (4096 / 2048): re-initialised
TEXT_WIDTH_PREFIXES = ("context_embedder.", "time_text_embed.text_embedder.")
# a deterministic sin-cos table (PatchEmbed rebuilds it identically): fine if a checkpoint lacks it
_REBUILT_BUFFERS = ("pos_embed.pos_embed",)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter entries (buffers are not counted); works on meta-device modules."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------- RoPE tables
def rope_1d(n: int, head_dim: int, base: float = 10000.0, device: torch.device | str | None = None) -> RopeTable:
    """1D RoPE for positions 0..n-1 over the whole head dim -> (cos, sin), each (n, head_dim) float32."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    pos = torch.arange(n, device=device, dtype=torch.float32)
    return get_1d_rotary_pos_embed(head_dim, pos, theta=base, use_real=True, repeat_interleave_real=True)


def rope_2d(h: int, w: int, head_dim: int, base: float = 10000.0,
            device: torch.device | str | None = None) -> RopeTable:
    """2D RoPE for a raster-ordered h x w grid -> (cos, sin), each (h*w, head_dim) float32.

    The first head_dim/2 dims rotate with the row index, the last head_dim/2 with the column index,
    each with the frequencies of a 1D RoPE over head_dim/2 (system/models/rope.py's layout)."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)  # (h*w,) r of index r*w+c
    cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)  # (h*w,) c
    cr, sr = get_1d_rotary_pos_embed(head_dim // 2, rows, theta=base, use_real=True, repeat_interleave_real=True)
    cc, sc = get_1d_rotary_pos_embed(head_dim // 2, cols, theta=base, use_real=True, repeat_interleave_real=True)
    return torch.cat([cr, cc], dim=-1), torch.cat([sr, sc], dim=-1)


def _rotate(x: Tensor, rope: Optional[RopeTable], name: str) -> Tensor:
    """x (B, H, L, D) rotated by rope (cos, sin) each (L, D); identity when rope is None."""
    if rope is None:
        return x
    cos, sin = rope
    if cos.shape != (x.shape[2], x.shape[3]) or sin.shape != cos.shape:
        raise ValueError(f"{name} tables {tuple(cos.shape)}/{tuple(sin.shape)} do not fit q/k {tuple(x.shape)}: "
                         f"need ({x.shape[2]}, {x.shape[3]})")
    return apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=2)


# --------------------------------------------------------------------------- attention processor
def _heads(x: Tensor, heads: int, projs: tuple, norms: tuple, rope: Optional[RopeTable], name: str
           ) -> tuple[Tensor, Tensor, Tensor]:
    """One stream's q, k, v (B, H, L, D) from x (B, L, C): the projections, q/k-norm where present,
    then the stream's rotation of q and k."""
    b = x.shape[0]
    q, k, v = (p(x).view(b, -1, heads, p.out_features // heads).transpose(1, 2) for p in projs)
    norm_q, norm_k = norms
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return _rotate(q, rope, name), _rotate(k, rope, name), v


class JointRoPEAttnProcessor:
    """diffusers' JointAttnProcessor2_0 with RoPE: 2D tables on the image stream's q/k, 1D tables on
    the token (context) stream's q/k, applied after qk-norm and before the joint attention."""

    def __init__(self) -> None:
        if not hasattr(F, "scaled_dot_product_attention"):
            raise ImportError("JointRoPEAttnProcessor needs torch.nn.functional.scaled_dot_product_attention")

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,  # (B, N, C) image stream
        encoder_hidden_states: Optional[Tensor] = None,  # (B, K, C) token stream, or None (image self-attention)
        attention_mask: Optional[Tensor] = None,
        image_rope: Optional[RopeTable] = None,  # (cos, sin) each (N, head_dim)
        token_rope: Optional[RopeTable] = None,  # (cos, sin) each (K, head_dim)
    ) -> Tensor | tuple[Tensor, Tensor]:
        if attention_mask is not None:
            raise NotImplementedError("JointRoPEAttnProcessor does not support attention masks")
        b, n = hidden_states.shape[:2]
        q, k, v = _heads(hidden_states, attn.heads, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k),
                         image_rope, "image_rope")  # (B, H, N, D)
        head_dim = k.shape[-1]
        if encoder_hidden_states is not None:
            cq, ck, cv = _heads(encoder_hidden_states, attn.heads, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                                (attn.norm_added_q, attn.norm_added_k), token_rope, "token_rope")  # (B, H, K, D)
            q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)  # (B, H, N+K, D)

        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)  # (B, H, L, D)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(q.dtype)  # (B, L, H*D)

        if encoder_hidden_states is not None:
            out, ctx = out[:, :n], out[:, n:]  # (B, N, H*D), (B, K, H*D)
            if not attn.context_pre_only:
                ctx = attn.to_add_out(ctx)
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        return (out, ctx) if encoder_hidden_states is not None else out


# --------------------------------------------------------------------------- encoder
@dataclass
class MMDiTEncoderConfig:
    in_channels: int = 16  # SD3.5 VAE latent channels
    latent_size: int = 32  # nominal latent side (256 px / 8); forward takes any multiple of patch_size
    patch_size: int = 2
    depth: int = 8
    width: int = 768
    heads: int = 12
    num_tokens: int = 256  # K 1D tokens
    token_dim: int = 18  # output width = BSQ bits
    mlp_ratio: float = 4.0
    qk_norm: bool = True  # RMSNorm on q/k per head
    rope_base: float = 10000.0
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if (self.width // self.heads) % 4:
            raise ValueError(f"head dim {self.width // self.heads} must be divisible by 4 (2D RoPE)")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


class MMDiTEncoderOutput(NamedTuple):
    tokens: Tensor  # (B, K, token_dim) pre-quantisation 1D tokens
    image: Tensor  # (B, N, width) final-LayerNormed image stream
    grid: tuple[int, int]  # (h / p, w / p): the image stream's patch grid, N = h/p * w/p


class MMDiTEncoderBlock(nn.Module):
    """Dual-stream MMDiT block without AdaLN (names as in diffusers' JointTransformerBlock)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.norm1_context = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(
            query_dim=width, added_kv_proj_dim=width, dim_head=width // heads, heads=heads, out_dim=width,
            context_pre_only=False, bias=True, qk_norm="rms_norm" if qk_norm else None, eps=1e-6,
            processor=JointRoPEAttnProcessor(),
        )
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.ff = FeedForward(width, width, mult=mlp_ratio, activation_fn="gelu-approximate")
        self.norm2_context = nn.LayerNorm(width, eps=1e-6)
        self.ff_context = FeedForward(width, width, mult=mlp_ratio, activation_fn="gelu-approximate")

    def forward(self, img: Tensor, tok: Tensor, image_rope: RopeTable, token_rope: RopeTable) -> tuple[Tensor, Tensor]:
        """img (B, N, C), tok (B, K, C) -> (img, tok) same shapes."""
        a_img, a_tok = self.attn(self.norm1(img), self.norm1_context(tok), image_rope=image_rope, token_rope=token_rope)
        img, tok = img + a_img, tok + a_tok
        img = img + self.ff(self.norm2(img))
        tok = tok + self.ff_context(self.norm2_context(tok))
        return img, tok


class MMDiTEncoder(nn.Module):
    """VAE latents -> K 1D tokens (+ the image stream), module doc."""

    def __init__(self, cfg: MMDiTEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(height=cfg.latent_size, width=cfg.latent_size, patch_size=cfg.patch_size,
                                      in_channels=cfg.in_channels, embed_dim=cfg.width, pos_embed_type=None)
        self.token_embed = nn.Parameter(torch.zeros(cfg.num_tokens, cfg.width))
        self.blocks = nn.ModuleList(
            [MMDiTEncoderBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth)])
        self.norm_image = nn.LayerNorm(cfg.width, eps=1e-6)
        self.norm_tokens = nn.LayerNorm(cfg.width, eps=1e-6)
        self.proj_tokens = nn.Linear(cfg.width, cfg.token_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight  # conv as a linear over the flattened patch (DiT)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.token_embed, std=0.02)

    def forward(self, latents: Tensor) -> MMDiTEncoderOutput:
        """latents (B, C, h, w), h and w multiples of patch_size -> MMDiTEncoderOutput."""
        c, p = self.cfg, self.cfg.patch_size
        b, ch, h, w = latents.shape
        if ch != c.in_channels or h % p or w % p:
            raise ValueError(f"latents {tuple(latents.shape)}: need {c.in_channels} channels and sides "
                             f"divisible by {p}")
        gh, gw = h // p, w // p
        img = self.patch_embed(latents)  # (B, N, width), N = gh * gw
        tok = self.token_embed.to(img.dtype).unsqueeze(0).expand(b, -1, -1)  # (B, K, width)
        image_rope = rope_2d(gh, gw, c.head_dim, c.rope_base, device=latents.device)  # 2 x (N, head_dim)
        token_rope = rope_1d(c.num_tokens, c.head_dim, c.rope_base, device=latents.device)  # 2 x (K, head_dim)
        ckpt = c.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if ckpt:
                img, tok = torch.utils.checkpoint.checkpoint(block, img, tok, image_rope, token_rope,
                                                             use_reentrant=False)
            else:
                img, tok = block(img, tok, image_rope, token_rope)
        tokens = self.proj_tokens(self.norm_tokens(tok))  # (B, K, token_dim)
        return MMDiTEncoderOutput(tokens, self.norm_image(img), (gh, gw))


# --------------------------------------------------------------------------- decoder
@dataclass
class MMDiTDecoderConfig:
    in_channels: int = 16  # latent channels (in = out)
    patch_size: int = 2
    depth: int = 24
    heads: int = 24
    head_dim: int = 64
    token_dim: int = 18  # width of the conditioning tokens (BSQ bits)
    dual_attention_layers: tuple[int, ...] = tuple(range(13))  # SD3.5-Medium: blocks 0..12
    qk_norm: Optional[str] = "rms_norm"
    pos_embed_max_size: int = 384
    sample_size: int = 128
    rope_base: float = 10000.0
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.dual_attention_layers = tuple(int(i) for i in self.dual_attention_layers)
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be divisible by 4 (2D RoPE)")

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


class MMDiTDecoder(nn.Module):
    """SD3Transformer2DModel (SD3.5-Medium shape) conditioned on 1D tokens, with 2D/1D RoPE (module doc)."""

    def __init__(self, cfg: MMDiTDecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.mmdit = SD3Transformer2DModel(
            sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
            out_channels=cfg.in_channels, num_layers=cfg.depth, attention_head_dim=cfg.head_dim,
            num_attention_heads=cfg.heads, joint_attention_dim=cfg.token_dim, caption_projection_dim=cfg.width,
            pooled_projection_dim=cfg.token_dim, pos_embed_max_size=cfg.pos_embed_max_size,
            dual_attention_layers=cfg.dual_attention_layers, qk_norm=cfg.qk_norm,
        )
        self.mmdit.set_attn_processor(JointRoPEAttnProcessor())  # attn and attn2 of every block
        # SD3's sin-cos table is a persistent buffer (226M entries, 0.9 GB at pos_embed_max_size 384):
        # deterministic, so kept out of our checkpoints and exports (PatchEmbed rebuilds it)
        pe = self.mmdit.pos_embed
        table = pe._buffers.pop("pos_embed")
        pe.register_buffer("pos_embed", table, persistent=False)
        if cfg.grad_checkpointing:
            self.mmdit.enable_gradient_checkpointing()

    def forward(self, x_t: Tensor, tokens: Tensor, t: Tensor) -> Tensor:
        """x_t (B, C, h, w), tokens (B, K, token_dim), t (B,) or scalar in [0, 1] -> (B, C, h, w)."""
        c, p = self.cfg, self.cfg.patch_size
        b, _, h, w = x_t.shape
        if h % p or w % p:
            raise ValueError(f"x_t {tuple(x_t.shape)}: sides must be divisible by patch size {p}")
        t = torch.as_tensor(t, device=x_t.device).float().reshape(-1).expand(b)  # (B,) float32: t x 1000 exact
        kwargs = {
            "image_rope": rope_2d(h // p, w // p, c.head_dim, c.rope_base, device=x_t.device),  # 2 x (N, head_dim)
            "token_rope": rope_1d(tokens.shape[1], c.head_dim, c.rope_base, device=x_t.device),  # 2 x (K, head_dim)
        }
        return self.mmdit(
            hidden_states=x_t, encoder_hidden_states=tokens, pooled_projections=tokens.mean(1),  # (B, token_dim)
            timestep=t * 1000.0, joint_attention_kwargs=kwargs, return_dict=False,
        )[0]

    @torch.no_grad()
    def load_pretrained(self, source: str) -> list[str]:
        """Copy SD3(.5) transformer weights from a local folder into `self.mmdit`.

        `source`: a `save_pretrained` folder of SD3Transformer2DModel or a diffusers pipeline folder
        with a `transformer/` subfolder; safetensors weights (one file or an index of shards). Every
        tensor whose name and shape match is copied (cast to our dtype). Returns the sorted names
        (SD3 transformer naming) of our tensors left at their initialisation: only text-width
        dependent ones (`context_embedder.*`, `time_text_embed.text_embedder.*`) may be; any other
        missing, mismatched or unexpected key raises ValueError. In plan mode (system/models/weights.py)
        nothing is read and [] is returned."""
        from safetensors import safe_open

        if not weights.need("SD3 transformer (decoder init)", source):
            return []
        files = _safetensors_files(source)
        ours = self.mmdit.state_dict()
        loaded: set[str] = set()
        unexpected, mismatched = [], []
        for f in files:
            with safe_open(f, framework="pt", device="cpu") as st:
                for key in st.keys():
                    if key not in ours:
                        if key not in _REBUILT_BUFFERS:
                            unexpected.append(key)
                        continue
                    shape = tuple(st.get_slice(key).get_shape())
                    if shape != tuple(ours[key].shape):
                        mismatched.append(f"{key}: checkpoint {shape} vs ours {tuple(ours[key].shape)}")
                        continue
                    ours[key].copy_(st.get_tensor(key))
                    loaded.add(key)
        not_loaded = sorted(set(ours) - loaded)
        bad_missing = [k for k in not_loaded if not k.startswith(TEXT_WIDTH_PREFIXES) and k not in _REBUILT_BUFFERS]
        bad_mismatch = [m for m in mismatched if not m.startswith(TEXT_WIDTH_PREFIXES)]
        if unexpected or bad_missing or bad_mismatch:
            raise ValueError(f"{source}: not an SD3 transformer of this shape: missing {bad_missing[:8]}, "
                             f"mismatched {bad_mismatch[:8]}, unexpected {sorted(unexpected)[:8]} "
                             f"({len(bad_missing)}/{len(bad_mismatch)}/{len(unexpected)} in all)")
        return [k for k in not_loaded if k not in _REBUILT_BUFFERS]


def _safetensors_files(source: str) -> list[str]:
    """The safetensors weight files of an SD3 transformer folder (or of a pipeline's transformer/)."""
    folder = source
    if os.path.isdir(os.path.join(source, "transformer")):
        folder = os.path.join(source, "transformer")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{source} is not a folder")
    index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if len(found) == 1:
        return [os.path.join(folder, found[0])]
    raise FileNotFoundError(f"{folder}: expected diffusion_pytorch_model.safetensors (or its index), found {found}")
