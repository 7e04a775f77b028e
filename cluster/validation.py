"""Validation on the training workers (the rank loop calls `validate_on_ranks`): each rank reads
its own share of the validation split (`SourceFactory.validation`), the method's `validate` gives
per-batch sums, the ranks add them (one all-reduce) and `val_metrics` turns the totals into metrics
of the whole validation sample. A bounded image count by default (`train.val_max_images`).

Lockstep: before each batch the ranks agree (an all-reduce of "I have a batch", MIN) whether every
rank still has one, so ZeRO-3's gathered forwards and the final all-reduce never wait on a rank
whose share ran out first. The reader's validation shares differ by at most one sample per rank,
so at most one short last batch of a rank can be left out (`val/images` says how many were seen).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

from system.methods.base import Method


def _all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def validate_on_ranks(method: Method, mods: dict[str, torch.nn.Module], batches: Iterable[Any], *, world_size: int,
                      batch_size: int, max_images: int, device: torch.device,
                      to_device: Callable[[Any, torch.device], Any]) -> Optional[dict[str, float]]:
    """Collective: the method's validation metrics over at most `max_images` images of all ranks
    (0: every batch the ranks have), or None when the method validates nothing. `batches`: this
    rank's share of the validation split."""
    limit = math.ceil(max_images / (world_size * batch_size)) if max_images else None
    totals: dict[str, torch.Tensor] = {}
    it = iter(batches)
    done = 0
    training = {n: m.training for n, m in mods.items()}
    for m in mods.values():
        m.eval()
    try:
        with torch.no_grad():
            while limit is None or done < limit:
                batch = next(it, None)
                have = _all_reduce(torch.tensor([0.0 if batch is None else 1.0], device=device), dist.ReduceOp.MIN
                                   if dist.is_initialized() else None)
                if have.item() == 0:
                    break
                for k, v in method.validate(mods, to_device(batch, device)).items():
                    v = v.detach().float()
                    totals[k] = totals[k] + v if k in totals else v.clone()
                done += 1
    finally:
        for n, m in mods.items():
            m.train(training[n])
    if not totals:
        return None
    keys = sorted(totals)
    flat = _all_reduce(torch.cat([totals[k].reshape(-1) for k in keys]))
    out, i = {}, 0
    for k in keys:
        n = totals[k].numel()
        out[k] = flat[i:i + n].reshape(totals[k].shape).cpu()
        i += n
    return method.val_metrics(out)
