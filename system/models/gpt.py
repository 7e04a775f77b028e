"""LlamaGen-style decoder-only image GPT (class-conditional), with the variants our papers need.

- AR mode (default): input [cls; tok_0 .. tok_{L-2}] with a causal mask;
  ``logits[:, i]`` predicts ``tokens[:, i]``.
- Masked mode (``bidirectional=True``, SemTok / MaskGIT): input [cls; tokens]
  with masked positions replaced by a learned mask embedding, no causal mask.
- Inputs: token ids or a probability matrix (B, L, V) (EOSTok's differentiable embedding
  h = Ind^T E), embedded through one of two tables, chosen by ``code_dim``:
  ``code_dim=None``: the model's own full-rank table E = ``tok_embeddings`` (V, dim): ids look
  rows up, probs give probs @ E. ``code_dim=D``: the tokenizer's codebook (V, D), passed in as
  ``codebook``, then ``code_proj`` (D -> dim): ids give codebook[ids] @ P, probs
  (probs @ codebook) @ P; no ``tok_embeddings`` is built (it would never be read). Either way
  sampling embeds ids through the same table training used, and every parameter is read.
- Heads: softmax over the vocabulary, or a bitwise head (one binary
  classifier per index bit; logits shaped (..., n_bits, 2)).
- Optional shared AdaLN class conditioning (SemTok) on top of the class token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from system.models.attention import host_span
from system.models.blocks import KVCache, RMSNorm, TransformerBlock, find_multiple, modulate, zero_init
from system.models.rope import ROPE_KINDS, build_rope

HEADS = ("softmax", "bitwise")


@dataclass
class GPTConfig:
    vocab_size: int = 16384
    n_layer: int = 12
    n_head: int = 12
    dim: int = 768
    block_size: int = 256  # image tokens, a square grid in raster order
    num_classes: int = 1000
    cls_token_num: int = 1
    prefix_tokens: int = 0  # AliTok: 1D tokens generated before the image grid
    class_dropout: float = 0.1
    token_dropout: float = 0.1
    attn_dropout: float = 0.0
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    qk_norm: bool = False
    qkv_bias: bool = False
    proj_bias: bool = False  # bias of each attention output projection (AliTok's code)
    output_bias: bool = False  # bias of the output layer (AliTok's code)
    rope: str = "2d"  # "1d" | "2d" | "mixed" | "none"
    rope_base: float = 10000.0
    rope_cls: str = "zeros"  # LlamaGen zeroes the class token's q/k; "identity" leaves them unrotated
    norm_eps: float = 1e-5
    mlp_multiple_of: int = 256
    attn_backend: str = "auto"
    bidirectional: bool = False
    head: str = "softmax"  # "softmax" | "bitwise"
    n_bits: int = 0  # bitwise head: vocab_size == 2 ** n_bits
    adaln: bool = False
    code_dim: int | None = None  # EOSTok "codebook" input: codebook width (no own token table); None: own table
    init_std: float = 0.02
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} not divisible by n_head {self.n_head}")
        if self.rope not in ROPE_KINDS:
            raise ValueError(f"rope {self.rope!r} unknown; expected one of {ROPE_KINDS}")
        if self.head not in HEADS:
            raise ValueError(f"head {self.head!r} unknown; expected one of {HEADS}")
        if self.head == "bitwise" and (self.n_bits < 1 or self.vocab_size != 2**self.n_bits):
            raise ValueError(f"bitwise head needs n_bits >= 1 and vocab_size == 2**n_bits; got {self.n_bits}, {self.vocab_size}")
        if self.cls_token_num != 1:
            raise ValueError(f"cls_token_num={self.cls_token_num}: class-conditional models use exactly 1 class token")
        if self.rope in ("2d", "mixed") and math.isqrt(self.block_size) ** 2 != self.block_size:
            raise ValueError(f"block_size {self.block_size} is not a square number of image tokens (needed by "
                             f"rope={self.rope!r}; use rope='1d' for a 1D token sequence)")

    @property
    def seq_len(self) -> int:
        """Generated tokens per sample: prefix + image."""
        return self.prefix_tokens + self.block_size

    @property
    def grid(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def rope_grid(self) -> tuple[int, int]:
        """Image-token layout for RoPE: a square grid for 2D layouts, one row of block_size for 1D."""
        return (self.grid, self.grid) if self.rope in ("2d", "mixed") else (1, self.block_size)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def mlp_hidden(self) -> int:
        return find_multiple(int(8 * self.dim / 3), self.mlp_multiple_of)


def index_to_bits(idx: Tensor, n_bits: int) -> Tensor:
    """(...) int64 indices -> (...) x n_bits in {0, 1}, least significant bit first."""
    shifts = torch.arange(n_bits, device=idx.device)
    return (idx.unsqueeze(-1) >> shifts) & 1


def bits_to_index(bits: Tensor) -> Tensor:
    """(..., n_bits) in {0, 1} -> (...) int64 indices (LSB first)."""
    w = 2 ** torch.arange(bits.shape[-1], device=bits.device, dtype=torch.int64)
    return (bits.long() * w).sum(-1)


class BitEmbedding(nn.Module):
    """Embed an index through its bits (as +-1) with a linear map: no 2**n_bits table."""

    def __init__(self, n_bits: int, dim: int):
        super().__init__()
        self.n_bits = n_bits
        self.proj = nn.Linear(n_bits, dim, bias=False)

    def forward(self, idx: Tensor) -> Tensor:  # (B, L) -> (B, L, D)
        bits = index_to_bits(idx, self.n_bits).to(self.proj.weight.dtype)
        return self.proj(bits * 2 - 1)


class GPT(nn.Module):
    """Class-conditional image transformer; see module docstring for the modes."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.cls_embedding = nn.Embedding(cfg.num_classes + 1, d)  # last row = null class (CFG)
        self.tok_embeddings: nn.Module | None = None  # codebook input: ids embed through the codebook
        self.code_proj = nn.Linear(cfg.code_dim, d, bias=False) if cfg.code_dim else None
        if self.code_proj is None:
            self.tok_embeddings = BitEmbedding(cfg.n_bits, d) if cfg.head == "bitwise" else nn.Embedding(cfg.vocab_size, d)
        self.mask_embedding = nn.Parameter(torch.zeros(d)) if cfg.bidirectional else None
        self.tok_dropout = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList(
            TransformerBlock(
                d, cfg.n_head, mlp_hidden=cfg.mlp_hidden, qk_norm=cfg.qk_norm, qkv_bias=cfg.qkv_bias,
                proj_bias=cfg.proj_bias, attn_dropout=cfg.attn_dropout, resid_dropout=cfg.resid_dropout,
                ffn_dropout=cfg.ffn_dropout, norm_eps=cfg.norm_eps, backend=cfg.attn_backend, adaln_shared=cfg.adaln,
            )
            for _ in range(cfg.n_layer)
        )
        self.adaln_mod = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d)) if cfg.adaln else None
        self.final_adaln = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d)) if cfg.adaln else None
        self.norm = RMSNorm(d, cfg.norm_eps)
        n_out = 2 * cfg.n_bits if cfg.head == "bitwise" else cfg.vocab_size
        self.output = nn.Linear(d, n_out, bias=cfg.output_bias)
        rope = build_rope(cfg.rope, cfg.head_dim, cfg.cls_token_num, cfg.prefix_tokens, cfg.rope_grid, cfg.rope_base, cfg.rope_cls)
        self.register_buffer("rope", rope, persistent=False)  # (n_cls + seq_len, hd/2, 2)
        self._caches: list[KVCache] | None = None
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        """Keep the RoPE table in float32 when the model is cast (e.g. .to(torch.bfloat16))."""
        super()._apply(fn, recurse)
        if self.rope.dtype != torch.float32:
            c = self.cfg
            table = build_rope(c.rope, c.head_dim, c.cls_token_num, c.prefix_tokens, c.rope_grid, c.rope_base, c.rope_cls)
            self.rope = table.to(self.rope.device)
        return self

    # ----------------------------------------------------------------- init
    def reset_parameters(self) -> None:
        """LlamaGen init: N(0, std) for linear/embedding weights, zero biases, zero output layer."""
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.output.weight)
        for m in (self.adaln_mod, self.final_adaln):
            if m is not None:
                zero_init(m)
        if self.mask_embedding is not None:
            nn.init.normal_(self.mask_embedding, 0.0, std)

    def embedding_names(self) -> tuple[str, ...]:
        """The names of its embedding tables (token and class), e.g. to keep them out of weight decay."""
        tables = [("tok_embeddings", self.tok_embeddings), ("cls_embedding", self.cls_embedding)]
        return tuple(f"{n}.weight" for n, m in tables if isinstance(m, nn.Embedding))

    def num_params(self) -> int:
        """Parameters the model reads (no table is built that the forward never uses)."""
        return sum(p.numel() for p in self.parameters())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # exports and checkpoints written while a codebook-input GPT still built its (never read)
        # own table carry tok_embeddings.weight: drop it, nothing reads it
        if self.tok_embeddings is None:
            state_dict.pop(prefix + "tok_embeddings.weight", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------ embedding
    def embed_tokens(self, tokens: Tensor | None = None, probs: Tensor | None = None, codebook: Tensor | None = None) -> Tensor:
        """Token ids (B, L) or probs (B, L, V) -> (B, L, D).

        Own table E (``code_dim=None``; ``codebook`` must be None): E[ids] or probs @ E, so
        gradients reach probs and E. Codebook input (``code_dim`` set; ``codebook`` (V, code_dim)
        required): codebook[ids] @ P or (probs @ codebook) @ P, gradients reach probs and codebook.
        """
        if (tokens is None) == (probs is None):
            raise ValueError("give exactly one of tokens (B, L) ids or probs (B, L, V)")
        if self.code_proj is None:
            if codebook is not None:
                raise ValueError("this GPT embeds tokens through its own table (GPTConfig.code_dim=None): "
                                 "pass no codebook")
            if tokens is not None:
                return self.tok_embeddings(tokens)
            if not isinstance(self.tok_embeddings, nn.Embedding):
                raise ValueError("probs input needs a token table (softmax head), not the bitwise embedding")
            table = self.tok_embeddings.weight  # (V, D): h = Ind^T E
            return probs.to(table.dtype) @ table
        if codebook is None or codebook.shape != (self.cfg.vocab_size, self.cfg.code_dim):
            got = None if codebook is None else tuple(codebook.shape)
            raise ValueError(f"codebook must be ({self.cfg.vocab_size}, {self.cfg.code_dim}) "
                             f"(GPTConfig.code_dim is set); got {got}")
        cb = codebook.to(self.code_proj.weight.dtype)
        z = F.embedding(tokens, cb) if tokens is not None else probs.to(cb.dtype) @ cb  # (B, L, code_dim)
        return self.code_proj(z)

    def embed_labels(self, labels: Tensor) -> Tensor:
        """(B,) class ids (num_classes = null) -> (B, D); drops labels to null while training."""
        if self.training and self.cfg.class_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.cfg.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.cfg.num_classes), labels)
        return self.cls_embedding(labels)

    # ---------------------------------------------------------------- trunk
    def _trunk(self, h: Tensor, c: Tensor, rope: Tensor, pos: Tensor | None = None) -> Tensor:
        """h (B, S, D), class embedding c (B, D) -> normed hidden (B, S, D); pos != None uses the KV cache."""
        mod = self.adaln_mod(c) if self.adaln_mod is not None else None
        causal = not self.cfg.bidirectional
        for i, blk in enumerate(self.layers):
            if pos is not None:  # key j seen by query i iff j <= pos[i] (attention.cache_attention)
                h = blk(h, rope, None, False, mod, self._caches[i], pos)
            elif self.cfg.grad_checkpointing and self.training:
                h = checkpoint(blk, h, rope, None, causal, mod, use_reentrant=False)
            else:
                h = blk(h, rope, None, causal, mod)
        h = self.norm(h)
        if self.final_adaln is not None:
            shift, scale = self.final_adaln(c).chunk(2, dim=-1)
            h = modulate(h, shift, scale)
        return h

    def head(self, h: Tensor) -> Tensor:
        """(B, S, D) -> float logits (B, S, V) or (B, S, n_bits, 2) for the bitwise head."""
        logits = self.output(h).float()
        if self.cfg.head == "bitwise":
            logits = logits.unflatten(-1, (self.cfg.n_bits, 2))
        return logits

    def forward(
        self,
        tokens: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        probs: Tensor | None = None,
        codebook: Tensor | None = None,
        token_mask: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """tokens (B, L) ids or probs (B, L, V), labels (B,) -> logits (B, L, V).

        AR: logits[:, i] predicts tokens[:, i] from tokens[:, :i] (teacher forcing).
        Masked: token_mask (B, L) bool marks positions replaced by the mask embedding.
        With targets (B, L) ids, returns (logits, mean cross-entropy) instead; in
        masked mode the loss covers only the masked positions when token_mask is given.
        """
        if labels is None:
            raise ValueError("labels (B,) class ids are required (use num_classes for the null class)")
        x = self.embed_tokens(tokens, probs, codebook)  # (B, L, D)
        b, l, _ = x.shape
        if l > self.cfg.seq_len:
            raise ValueError(f"sequence of {l} tokens exceeds seq_len {self.cfg.seq_len} (prefix + block_size)")
        c = self.embed_labels(labels)  # (B, D)
        if self.cfg.bidirectional:
            if token_mask is not None:
                x = torch.where(token_mask.unsqueeze(-1), self.mask_embedding.to(x.dtype), x)
            h = torch.cat([c.unsqueeze(1).to(x.dtype), x], dim=1)  # (B, 1 + L, D)
        else:
            h = torch.cat([c.unsqueeze(1).to(x.dtype), x[:, :-1]], dim=1)  # (B, L, D)
        h = self._trunk(self.tok_dropout(h), c, self.rope[: h.shape[1]])
        logits = self.head(h[:, h.shape[1] - l :])  # (B, L, V) | (B, L, n_bits, 2)
        if targets is None:
            return logits
        return logits, self.loss(logits, targets, token_mask if self.cfg.bidirectional else None)

    def loss(self, logits: Tensor, targets: Tensor, where: Tensor | None = None) -> Tensor:
        """Mean cross-entropy of logits vs target ids (B, L), optionally over ``where`` (B, L) only."""
        if self.cfg.head == "bitwise":
            tgt = index_to_bits(targets, self.cfg.n_bits)  # (B, L, n_bits)
            ce = F.cross_entropy(logits.flatten(0, -2), tgt.flatten(), reduction="none").view(tgt.shape).mean(-1)
        else:
            ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        if where is None:
            return ce.mean()
        w = where.to(ce.dtype)
        return (ce * w).sum() / w.sum().clamp_min(1.0)

    # ------------------------------------------------------------- sampling
    def next_logits(self, tokens: Tensor, labels: Tensor, codebook: Tensor | None = None) -> Tensor:
        """Uncached AR step: logits (B, V) for the token after ``tokens`` (B, i), i >= 0."""
        c = self.cls_embedding(labels)
        h = c.unsqueeze(1)
        if tokens.shape[1] > 0:
            h = torch.cat([h, self.embed_tokens(tokens, codebook=codebook).to(h.dtype)], dim=1)
        h = self._trunk(h, c, self.rope[: h.shape[1]])
        return self.head(h[:, -1])

    def setup_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """A static KV cache per layer for ``batch`` sequences; ``dtype`` None: the dtype the layers
        compute keys in (e.g. bfloat16 under autocast), allocated at the first write (``prefill``)."""
        p = self.output.weight
        max_len = max_len or self.cfg.cls_token_num + self.cfg.seq_len
        self._caches = [
            KVCache(batch, self.cfg.n_head, max_len, self.cfg.head_dim, dtype, p.device) for _ in self.layers
        ]

    def clear_cache(self) -> None:
        self._caches = None

    def _cached_step(self, h: Tensor, c: Tensor, pos: Tensor) -> Tensor:
        if self._caches is None:
            raise RuntimeError("no KV cache: call setup_cache(batch) before prefill/decode_one")
        span = host_span(pos)  # host positions: rows sliced, no index tensor copied to the device (a sync)
        rope = self.rope[span[0] : span[0] + span[1]] if span else self.rope.index_select(0, pos.to(self.rope.device))
        h = self._trunk(h, c, rope, pos)
        return self.head(h[:, -1])

    def prefill(self, labels: Tensor) -> Tensor:
        """Run the class token(s) into the cache; logits (B, V) for the first token."""
        c = self.cls_embedding(labels)
        pos = torch.arange(self.cfg.cls_token_num)  # host positions: the filled length is known without a sync
        return self._cached_step(c.unsqueeze(1), c, pos)

    def decode_one(self, token: Tensor, pos: Tensor, labels: Tensor, codebook: Tensor | None = None) -> Tensor:
        """token (B, 1) at sequence position pos (1,) -> logits (B, V) for the next token.

        Sequence position of generated token i is cls_token_num + i. ``labels``
        feeds AdaLN (ignored without it). ``pos`` on the host (eager sampling)
        lets attention read only the filled part of the cache; on the device
        (torch.compile, CUDA graphs) the step has no data-dependent control flow.
        """
        c = self.cls_embedding(labels)
        h = self.embed_tokens(token, codebook=codebook).to(c.dtype)
        return self._cached_step(h, c, pos)
