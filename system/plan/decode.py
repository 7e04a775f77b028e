"""Decode plans: sampling a generator and VAπ's rollouts, traced with fake tensors.

`plan_sampling(gpt_cfg, batch, cfg_scale)`: one decode step of a next-token GPT with its static KV
cache at full length (system/sampling/ar.py; CFG doubles the rows), or one full forward of a masked
(bidirectional) GPT per sampling step. Bytes: weights + KV cache + the step's activation peak; the
time of a step is the larger of its FLOPs at `mfu` of the card's peak and the bytes it reads
(weights and the whole cache: the static cache is read at full length every step) at `bw_eff` of
the card's bandwidth; a batch of images takes seq_len such steps (masked: `steps`).

`plan_rollout(vapi_cfg, data, images)`: one rollout call of a VAπ actor (system/methods/vapi.py
`rollout`: teacher-forced policy forward, G samples per image, tokenizer decode and LPIPS reward in
chunks) on `images` images, as the actor runs it, on fake tensors.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from system.models import weights
from system.plan.cards import Fit, card as card_named
from system.plan.trace import Meter, autocast_for, fake_build, fake_mode

DEFAULT_BW_EFF = 0.7  # fraction of the HBM bandwidth a decode step reaches


@dataclass
class DecodePlan:
    kind: str  # "kv-cache" (next-token) | "masked" (bidirectional, full forwards) | "rollout" (VAπ)
    card: str
    rows: int  # sequences per forward (CFG: 2 x images)
    images: int  # images per batch
    seq_len: int
    weights_bytes: int
    cache_bytes: int  # KV cache (kv-cache kind)
    activation_bytes: int  # peak of one step
    total_bytes: int
    flops_per_step: float
    steps: int  # forwards per batch of images
    step_seconds: float
    bound: str  # "compute" | "memory": which of FLOPs and bytes sets step_seconds
    seconds_per_image: float
    images_per_hour: float  # one card
    fits: list[Fit]
    weights: list[dict]  # weight sources (rollout plans)
    trace_seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def _timing(flops: float, read: int, c: Any, precision: str, mfu: float, bw_eff: float) -> tuple[float, str]:
    peak = c.bf16_flops if precision == "bf16" else c.bf16_flops / 2
    compute, memory = flops / (peak * mfu), read / (c.bandwidth * bw_eff)
    return (compute, "compute") if compute >= memory else (memory, "memory")


def _finish(kind: str, c: Any, rows: int, images: int, seq: int, wbytes: int, cache: int, acts: int, flops: float,
            steps: int, precision: str, mfu: float, bw_eff: float, refs: list, t0: float) -> DecodePlan:
    step_s, bound = _timing(flops, wbytes + cache, c, precision, mfu, bw_eff)
    per_image = step_s * steps / max(images, 1)
    total = wbytes + cache + acts
    return DecodePlan(kind, c.name, rows, images, seq, wbytes, cache, acts, total, flops, steps, step_s, bound, per_image,
                      3600.0 / per_image if per_image else 0.0, [Fit.of(card_named(k), total) for k in ("h100", "h200")],
                      refs, time.perf_counter() - t0)


def plan_sampling(gpt_cfg: Any, batch: int, cfg_scale: float = 1.0, *, precision: str = "bf16", card: str = "h100",
                  mfu: float = 0.4, bw_eff: float = DEFAULT_BW_EFF, steps: Optional[int] = None) -> DecodePlan:
    """The decode plan of sampling `batch` images with the GPT of `gpt_cfg` (module doc). `steps`:
    sampling steps of a masked GPT (default: system.sampling.gpt_generator.MASKED_STEPS)."""
    from system.sampling.gpt_generator import MASKED_STEPS
    from system.models.gpt import GPT

    t0 = time.perf_counter()
    c = card_named(card)
    rows = batch * (2 if cfg_scale != 1.0 else 1)
    mode = fake_mode()
    with mode, fake_build():
        model = GPT(gpt_cfg).eval()
    n_cls, seq = gpt_cfg.cls_token_num, gpt_cfg.seq_len
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tracker = Meter()
    with mode, torch.no_grad():
        tracker.known(iter(list(model.parameters()) + list(model.buffers())))
        labels = torch.zeros(rows, dtype=torch.long)
        if gpt_cfg.bidirectional:
            cache = 0
            with tracker, autocast_for(precision)():
                tokens = torch.zeros(rows, seq, dtype=torch.long)
                model(tokens, labels, token_mask=torch.ones(rows, seq, dtype=torch.bool))
            kind, n_steps = "masked", min(steps or MASKED_STEPS, seq)
        else:
            with tracker:
                model.setup_cache(rows, n_cls + seq)
            cache, start = tracker.live(), len(tracker.events)
            with tracker, autocast_for(precision)():
                token = torch.zeros(rows, 1, dtype=torch.long)
                # a GPT that embeds codes through its tokenizer's codebook reads it every step
                codebook = torch.zeros(gpt_cfg.vocab_size, gpt_cfg.code_dim) if gpt_cfg.code_dim else None
                model.decode_one(token, torch.tensor([n_cls + seq - 1]), labels, codebook)
            kind, n_steps = "kv-cache", seq
            model.clear_cache()
    acts = tracker.peak(start=start) if cache else tracker.peak()
    return _finish(kind, c, rows, batch, seq, wbytes, cache, acts, tracker.flops, n_steps,
                   precision, mfu, bw_eff, [], t0)


def plan_rollout(vapi_cfg: Any, data: Any, images: int, *, precision: str = "bf16", card: str = "h100",
                 mfu: float = 0.4, bw_eff: float = DEFAULT_BW_EFF) -> DecodePlan:
    """One VAπ rollout call on `images` images, as an actor runs it (module doc): policy, tokenizer and
    LPIPS built in plan mode (no weights read), `rollout` traced on fake tensors."""
    from system.methods.vapi import load_parts, rollout, rollout_config

    t0 = time.perf_counter()
    c = card_named(card)
    m = vapi_cfg
    mode = fake_mode()
    with weights.planning() as refs, mode, fake_build():
        policy, tok, lp = load_parts(m.export_url, m.llamagen_gpt, m.llamagen_vq, m.lpips_net.vgg_path, m.lpips_net.lin_path,
                                     use_lpips=m.w_lpips > 0, storage=data.storage, llamagen_preset=m.llamagen_preset,
                                     **m.gpt_overrides)
    parts = [x for x in (policy, tok, lp) if x is not None]
    params = list({id(p): p for x in parts for p in x.parameters()}.values())
    bufs = list({id(b): b for x in parts for b in x.buffers()}.values())
    wbytes = sum(t.numel() * t.element_size() for t in params + bufs)
    rcfg = rollout_config(m)
    tracker = Meter()
    res = int(data.resolution)
    with mode, torch.no_grad():
        tracker.known(iter(params + bufs))
        with tracker, autocast_for(precision)():
            x = torch.rand(images, 3, res, res) * 2 - 1
            labels = torch.zeros(images, dtype=torch.long)
            gen = torch.Generator().manual_seed(0)
            rollout(policy, tok, lp, x, labels, torch.arange(images), rcfg, gen)
    return _finish("rollout", c, images * rcfg.group_size, images, int(policy.seq_len), wbytes, 0, tracker.peak(),
                   tracker.flops, 1, precision, mfu, bw_eff, [r.as_dict() for r in refs], t0)
