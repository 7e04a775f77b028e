"""Autoregressive sampling with a static KV cache and classifier-free guidance.

Per image: one ``prefill`` (class token) and N-1 ``decode_one`` steps, each a
fixed-shape graph (no data-dependent Python control flow), so
``torch.compile(model.decode_one)`` captures it once. CFG runs the batch
doubled as [cond; null class] and mixes logits as u + s * (c - u), with the
scale s following a schedule over the N steps.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

SCHEDULES = ("constant", "linear", "power-cosine")


def cfg_scale_at(step: int, n_steps: int, scale: float, schedule: str = "constant", power: float = 1.0) -> float:
    """Guidance scale at ``step`` of ``n_steps`` (ratio r = step / n_steps).

    constant: s; linear: 1 + (s - 1) r; power-cosine (AliTok / RAR): 1 + (s - 1) (1 - cos(pi r^power)) / 2.
    """
    r = step / n_steps
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * r
    if schedule == "power-cosine":
        return 1.0 + (scale - 1.0) * (1.0 - math.cos(math.pi * r**power)) / 2.0
    raise ValueError(f"unknown CFG schedule {schedule!r}; expected one of {SCHEDULES}")


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf; (..., V) -> (..., V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(logits, dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = (cum - srt.softmax(-1)) >= top_p  # keep tokens until the mass before them reaches p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def sample_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """(..., V) logits -> (...) ids. temperature 0 is greedy. Uses the exponential race
    argmax(p / E), E ~ Exp(1), which samples from p without a data-dependent multinomial."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)


def guide(logits: Tensor, scale: float | Tensor, cfg: bool) -> Tensor:
    """Doubled-batch logits (2B, V) -> guided (B, V); identity when cfg is off."""
    if not cfg:
        return logits
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def generate(
    model,
    labels: Tensor,
    cfg_scale: float = 1.0,
    schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    *,
    cfg_power: float = 1.0,
    num_tokens: int | None = None,
    codebook: Tensor | None = None,
    use_cache: bool = True,
    decode_fn: Callable | None = None,
) -> Tensor:
    """Sample token sequences (B, N) for class ``labels`` (B,).

    ``use_cache=False`` recomputes the full sequence every step (reference /
    benchmark). ``decode_fn`` replaces ``model.decode_one`` (e.g. a compiled one).
    CFG is on when cfg_scale != 1 or the schedule is not constant.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown CFG schedule {schedule!r}; expected one of {SCHEDULES}")
    if generator is None and seed is not None:
        generator = torch.Generator(device=labels.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    cfg = model.cfg
    n = num_tokens or cfg.seq_len
    b = labels.shape[0]
    use_cfg = cfg_scale != 1.0
    lab = torch.cat([labels, torch.full_like(labels, cfg.num_classes)]) if use_cfg else labels
    out = torch.zeros(b, n, dtype=torch.long, device=labels.device)

    def pick(logits: Tensor, i: int) -> Tensor:
        s = cfg_scale_at(i, n, cfg_scale, schedule, cfg_power)
        return sample_logits(guide(logits, s, use_cfg), temperature, top_k, top_p, generator)

    if use_cache:
        decode = decode_fn or model.decode_one
        model.setup_cache(lab.shape[0], cfg.cls_token_num + n)
        positions = torch.arange(cfg.cls_token_num, cfg.cls_token_num + n, device=labels.device)
        try:
            logits = model.prefill(lab)
            for i in range(n):
                tok = pick(logits, i)
                out[:, i] = tok
                if i + 1 < n:
                    inp = torch.cat([tok, tok]) if use_cfg else tok
                    logits = decode(inp[:, None], positions[i : i + 1], lab, codebook)
        finally:
            model.clear_cache()
    else:
        for i in range(n):
            prev = out[:, :i]
            prev = torch.cat([prev, prev]) if use_cfg else prev
            out[:, i] = pick(model.next_logits(prev, lab, codebook), i)
    model.train(was_training)
    return out
