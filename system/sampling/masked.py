"""Masked (MaskGIT / MAR-style) sampling for a bidirectional GPT (``cfg.bidirectional``).

Every sample draws a random order of its N positions. Step t of T reveals the
next chunk of that order so that N * cos(pi/2 * (t+1)/T) positions stay masked
afterwards (at least one new position per step, none left after the last).
CFG is linear in the fraction of already-predicted tokens. For a bitwise head
each bit is sampled from its own 2-way distribution with per-bit top-p.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from system.models.gpt import bits_to_index
from system.sampling.ar import guide, sample_logits


def mask_schedule(n: int, steps: int) -> list[int]:
    """Number of positions still masked after each of ``steps`` steps (cosine, strictly decreasing, ends at 0)."""
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be in [1, {n}] for {n} tokens; got {steps}")
    left, prev = [], n
    for t in range(steps):
        m = int(math.floor(n * math.cos(math.pi / 2 * (t + 1) / steps)))
        m = min(m, prev - 1, n - (t + 1))  # reveal >= 1 per step
        m = max(m, steps - (t + 1))  # keep >= 1 for each remaining step
        left.append(m)
        prev = m
    return left


@torch.no_grad()
def generate_masked(
    model,
    labels: Tensor,
    steps: int = 64,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> Tensor:
    """Sample (B, N) token ids for class ``labels`` (B,) from a masked model.

    top_p applies per bit for a bitwise head (SemTok uses 0.75), per token otherwise.
    """
    cfg = model.cfg
    if not cfg.bidirectional:
        raise ValueError("masked sampling needs a bidirectional model (GPTConfig.bidirectional=True)")
    if generator is None and seed is not None:
        generator = torch.Generator(device=labels.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    dev, b, n = labels.device, labels.shape[0], cfg.seq_len
    use_cfg = cfg_scale != 1.0
    lab = torch.cat([labels, torch.full_like(labels, cfg.num_classes)]) if use_cfg else labels
    # rank[b, j]: when position j is revealed in sample b's random order
    order = torch.rand(b, n, generator=generator, device=dev).argsort(dim=-1)
    rank = order.argsort(dim=-1)
    tokens = torch.zeros(b, n, dtype=torch.long, device=dev)
    known = torch.zeros(b, n, dtype=torch.bool, device=dev)
    masked = n
    for left in mask_schedule(n, steps):
        scale = 1.0 + (cfg_scale - 1.0) * (n - masked) / n  # linear in the ratio already predicted
        inp, msk = (torch.cat([tokens, tokens]), torch.cat([~known, ~known])) if use_cfg else (tokens, ~known)
        logits = guide(model(inp, lab, token_mask=msk), scale, use_cfg)  # (B, N, V) | (B, N, n_bits, 2)
        sampled = sample_logits(logits, temperature, top_k, top_p, generator)
        if cfg.head == "bitwise":
            sampled = bits_to_index(sampled)
        reveal = (rank < n - left) & ~known
        tokens = torch.where(reveal, sampled, tokens)
        known = known | reveal
        masked = left
    model.train(was_training)
    return tokens
