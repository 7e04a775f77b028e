"""GRPO math for VAπ (../shared/seeds/vapi.txt), as pure functions.

Group-normalised advantages, the per-token clipped importance-ratio objective (PPO clip), the
prior regulariser (cross-entropy on the ground-truth tokens) and an optional KL to a frozen
reference policy (k3 estimator). Shapes: N sampled sequences of L tokens over V codes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class GRPOConfig:
    clip_eps: float = 0.2  # PPO ratio clip, per token
    adv_clip: float = 5.0  # advantages clipped to [-adv_clip, adv_clip]
    adv_eps: float = 1e-8  # added to the group std (official VA-Pi: 1e-8)
    beta: float = 0.1  # weight of the prior regulariser (CE on ground-truth tokens)
    kl: float = 0.0  # weight of the KL to a frozen reference policy (0: off)
    temperature: float = 1.0  # the rollouts' sampling temperature: new log-probs from logits / T as the old ones


def group_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-8, clip: float = 5.0) -> Tensor:
    """rewards (N,), group ids (N,) -> (N,) (r - mean_g) / (std_g + eps), clipped at +-clip.

    std is the unbiased standard deviation within each group (0 for a group of one)."""
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards and group_ids must both be (N,); got {tuple(rewards.shape)} and {tuple(group_ids.shape)}")
    r = rewards.float()
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    g = uniq.numel()
    count = torch.zeros(g, device=r.device).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(g, device=r.device).index_add_(0, inv, r) / count
    dev = r - mean[inv]
    var = torch.zeros(g, device=r.device).index_add_(0, inv, dev * dev) / (count - 1).clamp_min(1)
    adv = dev / (var.sqrt()[inv] + eps)
    return adv.clamp(-clip, clip)


def clipped_objective(logp_new: Tensor, logp_old: Tensor, adv: Tensor, clip_eps: float = 0.2,
                      mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-token PPO objective. logp (N, L), adv (N,) -> (loss to minimise, fraction of clipped tokens).

    loss = -mean_tokens min(ratio * A, clip(ratio, 1-eps, 1+eps) * A), ratio = exp(logp_new - logp_old)."""
    ratio = torch.exp(logp_new - logp_old.detach())
    a = adv.detach()[:, None].to(ratio.dtype)
    unclipped = ratio * a
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * a
    obj = torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped).float()
    if mask is None:
        return -obj.mean(), was_clipped.mean()
    m = mask.to(obj.dtype)
    n = m.sum().clamp_min(1)
    return -(obj * m).sum() / n, (was_clipped * m).sum() / n


def prior_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Prior regulariser: mean cross-entropy of logits (B, L, V) against ground-truth ids (B, L)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def kl_k3(logp_new: Tensor, logp_ref: Tensor) -> Tensor:
    """Per-token KL(new || ref) estimate on tokens sampled from the policy (k3: e^d - d - 1, d = ref - new)."""
    d = logp_ref.detach() - logp_new
    return (torch.exp(d) - d - 1).mean()


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits) (..., V) gathered at ids (...) -> (...)."""
    return logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def grpo_loss(logits: Tensor, image_index: Tensor, tokens: Tensor, logp_old: Tensor, rewards: Tensor,
              group_ids: Tensor, gt_tokens: Tensor, cfg: GRPOConfig,
              ref_logits: Tensor | None = None, policy_from: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """The VAπ objective from one teacher-forced forward over B images.

    logits (B, L, V) of the policy given each image's (noised) ground-truth prefix; the N samples
    are rows image_index (N,) of it with tokens (N, L), sampling log-probs logp_old (N, L),
    rewards (N,), group ids (N,); gt_tokens (B, L). The policy terms (clipped objective, KL) cover
    positions >= `policy_from` only: the leading codes the decoder does not read (an AliTok
    tokenizer that drops its prefix codes) change no pixel, so the reward says nothing about them;
    the cross-entropy prior keeps covering every position. Returns (loss, metrics)."""
    logp_all = logits.float().log_softmax(-1)  # (B, L, V): the prior's likelihood (unscaled)
    # the sampling policy's log-probs, at the rollouts' temperature: an on-policy ratio is exactly 1
    logp_t = logp_all if cfg.temperature == 1.0 else (logits.float() / cfg.temperature).log_softmax(-1)
    logp_new = logp_t[image_index].gather(-1, tokens.unsqueeze(-1)).squeeze(-1)[:, policy_from:]  # (N, L - policy_from)
    logp_old, tokens = logp_old[:, policy_from:], tokens[:, policy_from:]
    adv = group_advantages(rewards, group_ids, cfg.adv_eps, cfg.adv_clip)
    pg, clip_frac = clipped_objective(logp_new, logp_old, adv, cfg.clip_eps)
    ce = F.nll_loss(logp_all.flatten(0, 1), gt_tokens.flatten())
    loss = pg + cfg.beta * ce
    metrics = {"pg_loss": pg.detach(), "ce_prior": ce.detach(), "clip_frac": clip_frac,
               "adv_mean": adv.mean(), "adv_std": adv.std() if adv.numel() > 1 else adv.new_zeros(()),
               "adv_abs_max": adv.abs().max(),
               "ratio_mean": torch.exp(logp_new - logp_old).mean().detach()}
    if ref_logits is not None and cfg.kl > 0:
        logp_ref = token_logprobs(ref_logits[image_index, policy_from:].float() / cfg.temperature, tokens)
        kl = kl_k3(logp_new, logp_ref)
        loss = loss + cfg.kl * kl
        metrics["kl"] = kl.detach()
    return loss, metrics
