"""Fake batches of the configured per-rank micro-batch, one builder per kind of data source (what
each method's `step` reads), made inside the fake mode of a trace (no data is read).

- image shards (`ImageShards`): {"image" (B, 3, R, R) float in [-1, 1], "label" (B,) long, "key"}
  plus "latents" (B, C, h, w) for a latent cache (`DataSpec.latents`);
- token shards (`TokenShards`): {"codes" (B, L) long, "label" (B,) long, "key"};
- VAπ rollouts (`VapiRollouts`): {"rollouts": Rollouts of this rank's images x group, "stats"}.

`register_batch(source_type, builder)` adds a kind; a builder gets (exp, data, fake method, world
size) and returns a zero-argument function that makes the batch.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from system.data.sources import DataSpec, ImageShards, TokenShards

BatchBuilder = Callable[[Any, DataSpec, Any, int], Callable[[], Any]]
_BUILDERS: list[tuple[type, BatchBuilder]] = []


def register_batch(source_type: type, builder: BatchBuilder) -> None:
    """Fake batches for methods trained on sources of `source_type` (most specific registered first)."""
    _BUILDERS.insert(0, (source_type, builder))


def batch_builder(source: Any) -> BatchBuilder:
    for kind, builder in _BUILDERS:
        if isinstance(source, kind):
            return builder
    raise TypeError(f"no fake batch for data source {type(source).__name__}: add one with "
                    "system.plan.batches.register_batch")


def _keys(b: int) -> list[str]:
    return [f"plan-{i:06d}" for i in range(b)]


def image_batch(exp: Any, data: DataSpec, fm: Any, world_size: int) -> Callable[[], Any]:
    b, r = int(exp.data.batch_size), int(data.resolution)
    classes = max(int(data.num_classes), 1)

    def make() -> dict:
        out = {"image": torch.rand(b, 3, r, r) * 2 - 1, "label": torch.randint(0, classes, (b,)), "key": _keys(b)}
        if data.latents is not None:
            z = data.latents
            out["latents"] = torch.randn(b, z.channels, z.size, z.size)
        return out

    return make


def token_batch(exp: Any, data: DataSpec, fm: Any, world_size: int) -> Callable[[], Any]:
    if data.tokens is None:
        raise ValueError("a token-shard method needs DataSpec.tokens (seq_len, vocab_size) to plan")
    b, t = int(exp.data.batch_size), data.tokens
    classes = max(int(data.num_classes), 1)
    return lambda: {"codes": torch.randint(0, t.vocab_size, (b, t.seq_len)), "label": torch.randint(0, classes, (b,)),
                    "key": _keys(b)}


def rollout_batch(exp: Any, data: DataSpec, fm: Any, world_size: int) -> Callable[[], Any]:
    """This learner rank's share of one VAπ iteration: data.batch_size / world images (groups), each
    with method.group_size samples of the policy's sequence length (system/methods/vapi.py)."""
    from system.methods.vapi import Rollouts

    m = exp.method
    if exp.data.batch_size % world_size:
        raise ValueError(f"data.batch_size={exp.data.batch_size} images per iteration cannot be split over "
                         f"cluster.num_workers={world_size} learner ranks")
    b, g = exp.data.batch_size // world_size, int(m.group_size)
    policy = fm.specs["policy"].module
    seq, vocab, classes = int(policy.seq_len), int(policy.vocab_size), int(policy.num_classes)

    def make() -> dict:
        n = b * g
        tokens = lambda rows: torch.randint(0, vocab, (rows, seq))  # noqa: E731
        image = torch.arange(b).repeat_interleave(g)
        r = Rollouts(inputs=tokens(b), gt_tokens=tokens(b), labels=torch.randint(0, classes, (b,)), tokens=tokens(n),
                     logp=-torch.rand(n, seq), rewards=torch.randn(n), group_ids=image.clone(), image_index=image,
                     mse=torch.rand(n), lpips=torch.rand(n))
        return {"rollouts": r, "stats": {"reward_mean": 0.0, "reward_std": 1.0}}

    return make


register_batch(ImageShards, image_batch)
register_batch(TokenShards, token_batch)


def _register_rollouts() -> None:
    from system.methods.vapi import VapiRollouts

    register_batch(VapiRollouts, rollout_batch)


_register_rollouts()
