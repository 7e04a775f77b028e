"""Token-level metrics: codebook usage/perplexity (defined with the quantizers) and AR next-token accuracy."""
from __future__ import annotations

import torch

from system.models.quantizers import codebook_perplexity, codebook_usage

__all__ = ["codebook_usage", "codebook_perplexity", "next_token_accuracy"]


@torch.no_grad()
def next_token_accuracy(logits: torch.Tensor, targets: torch.Tensor, top_k: int = 1, ignore_index: int = -100) -> float:
    """Fraction of positions whose target is among the top-k logits. (..., V) logits, (...) targets.

    Targets equal to ``ignore_index`` (e.g. padding or prefix positions) are left out; returns nan
    when every position is ignored.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits (..., V) and targets (...) disagree: {tuple(logits.shape)} vs {tuple(targets.shape)}")
    if not 1 <= top_k <= logits.shape[-1]:
        raise ValueError(f"top_k must be in [1, V={logits.shape[-1]}]; got {top_k}")
    flat_logits, flat_t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    keep = flat_t != ignore_index
    if not bool(keep.any()):
        return float("nan")
    top = flat_logits[keep].topk(top_k, dim=-1).indices  # (n, k)
    return float((top == flat_t[keep, None]).any(dim=-1).double().mean())
