"""cluster/validation.py: validation sums added over batches and ranks, bounded by an image count,
and ranks with uneven shares stay in lockstep (no rank waits on one that ran out)."""
from __future__ import annotations

import torch

from cluster.loop import to_device
from cluster.validation import validate_on_ranks
from multirank import run_ranks
from system.methods.base import Method


class SumMethod(Method):
    """validate: the count and the sum of the batch's values; val_metrics: their mean."""

    def __init__(self):
        super().__init__(None, None)

    def validate(self, mods, batch):
        x = batch["x"]
        return {"count": torch.tensor(float(len(x))), "sum": x.sum(), "hist": torch.bincount(x.long() % 3, minlength=3).float()}

    def val_metrics(self, totals):
        return {"images": float(totals["count"]), "mean": float(totals["sum"] / totals["count"]),
                "hist0": float(totals["hist"][0])}


def _batches(values, b):
    return [{"x": torch.tensor(values[i:i + b], dtype=torch.float32)} for i in range(0, len(values), b)]


def _run(method, batches, world=1, max_images=0):
    return validate_on_ranks(method, {}, batches, world_size=world, batch_size=2, max_images=max_images,
                             device=torch.device("cpu"), to_device=to_device)


def test_sums_over_batches_and_the_image_bound():
    m = SumMethod()
    assert _run(m, _batches(list(range(10)), 2)) == {"images": 10, "mean": 4.5, "hist0": 4}
    assert _run(m, _batches(list(range(10)), 2), max_images=4) == {"images": 4, "mean": 1.5, "hist0": 2}
    assert _run(Method(None, None), _batches([1, 2], 2)) is None  # a method without validation: nothing


def _rank(rank, world, shares):
    return validate_on_ranks(SumMethod(), {}, _batches(shares[rank], 2), world_size=world, batch_size=2, max_images=0,
                             device=torch.device("cpu"), to_device=to_device)


def test_uneven_shares_stop_together_and_agree():
    # rank 0 has 3 batches, rank 1 two: both stop after two (lockstep) and report the same totals
    out = run_ranks(_rank, 2, {0: [0, 1, 2, 3, 4, 5], 1: [10, 11, 12, 13]})
    assert out[0] == out[1] == {"images": 8, "mean": (0 + 1 + 2 + 3 + 10 + 11 + 12 + 13) / 8, "hist0": 3}
