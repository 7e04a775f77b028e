"""Inception Score: exp(E_x KL(p(y|x) || p(y))), averaged over splits (ADM / Salimans et al.)."""
from __future__ import annotations

import numpy as np
import torch


def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """(N, C) classifier logits -> (mean, std) of the IS over ``splits`` contiguous chunks.

    With 50k samples and 10 splits each chunk holds 5k, as in ADM's evaluator. Computed in float64
    from log-softmax, so confident (near one-hot) predictions stay finite.
    """
    t = logits.detach().cpu().double() if isinstance(logits, torch.Tensor) else torch.from_numpy(np.asarray(logits, np.float64))
    if t.dim() != 2:
        raise ValueError(f"logits must be (N, C); got shape {tuple(t.shape)}")
    if not 1 <= splits <= t.shape[0]:
        raise ValueError(f"splits must be in [1, N={t.shape[0]}]; got {splits}")
    logp = torch.log_softmax(t, dim=1)
    scores = []
    for part in torch.tensor_split(logp, splits, dim=0):
        log_marginal = torch.logsumexp(part, dim=0) - np.log(part.shape[0])  # log mean_x p(y|x)
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))
