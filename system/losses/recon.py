"""Pixel reconstruction losses, next-token cross-entropy and EOSTok's APR loss."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

Reduction = Literal["mean", "none"]


def _check_same(pred: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{name}: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")


def _reduce(err: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return err.mean()
    if reduction == "none":  # one value per sample
        return err.flatten(1).mean(dim=1)
    raise ValueError(f"reduction={reduction!r}; expected 'mean' or 'none'")


def l1_loss(pred: torch.Tensor, target: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Mean absolute error; ``reduction='none'`` gives (B,)."""
    _check_same(pred, target, "l1_loss")
    return _reduce((pred.float() - target.float()).abs(), reduction)


def l2_loss(pred: torch.Tensor, target: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Mean squared error; ``reduction='none'`` gives (B,)."""
    _check_same(pred, target, "l2_loss")
    return _reduce((pred.float() - target.float()).pow(2), reduction)


def ntp_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over the last dim with label smoothing, and top-1 accuracy.

    logits (..., V), targets (...) int64; ``mask`` (...) bool selects the positions that count
    (e.g. masked positions of a masked AR model); targets equal to ``ignore_index`` never count.
    A bitwise classifier is the V=2 case: logits (B, L, bits, 2), targets (B, L, bits) in {0,1}.
    Returns (loss, accuracy); accuracy is detached.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"ntp_loss: logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} + (vocab,)")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"ntp_loss: label_smoothing={label_smoothing}; expected 0 <= value < 1")
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_targets = targets.reshape(-1).long()
    valid = flat_targets != ignore_index
    if mask is not None:
        if mask.shape != targets.shape:
            raise ValueError(f"ntp_loss: mask {tuple(mask.shape)} must match targets {tuple(targets.shape)}")
        valid = valid & mask.reshape(-1).bool()
    per_tok = F.cross_entropy(
        flat_logits, flat_targets.masked_fill(~valid, 0), label_smoothing=label_smoothing, reduction="none"
    )
    count = valid.sum().clamp(min=1)
    loss = (per_tok * valid).sum() / count
    with torch.no_grad():
        correct = (flat_logits.argmax(dim=-1) == flat_targets) & valid
        acc = correct.sum().float() / count
    return loss, acc


def apr_loss(
    pred_images: torch.Tensor,
    real_images: torch.Tensor,
    lpips: nn.Module | None,
    lpips_weight: float = 1.0,
    l2_weight: float = 1.0,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """EOSTok APR loss: decoded AR predictions vs real images, ``l2_weight*L2 + lpips_weight*LPIPS``.

    Images (B,3,H,W) in [-1,1]. Also serves as the plain reconstruction term and as VAπ's reward
    (``-apr_loss(..., reduction='none')`` gives one value per sample). ``lpips=None`` or weight 0
    skips the perceptual term.
    """
    l2 = l2_loss(pred_images, real_images, reduction=reduction)
    loss = l2_weight * l2
    metrics = {"l2": l2.detach()}
    if lpips is not None and lpips_weight != 0.0:
        p = lpips(pred_images, real_images)  # (B,)
        p = p.mean() if reduction == "mean" else p
        loss = loss + lpips_weight * p
        metrics["lpips"] = p.detach()
    return loss, metrics
