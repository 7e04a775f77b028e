"""Accelerators a plan is stated for: memory a process can use, dense bf16 peak, HBM bandwidth.

Memory is what `torch.cuda.get_device_properties(0).total_memory` reports (the marketing "80 GB"
of an H100 is 79.2 GiB there); a plan fits when its bytes per rank stay under that minus a reserve
(CUDA context, NCCL buffers, allocator fragmentation: `RESERVE` of it).
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30
RESERVE = 0.10  # of the card's memory kept free for the CUDA context, NCCL and fragmentation


@dataclass(frozen=True)
class Card:
    name: str
    memory: int  # bytes
    bf16_flops: float  # dense peak, FLOP/s
    bandwidth: float  # HBM bytes/s

    def usable(self, reserve: float = RESERVE) -> int:
        return int(self.memory * (1.0 - reserve))


CARDS: dict[str, Card] = {
    "h100": Card("H100 SXM 80GB", int(79.2 * GiB), 989e12, 3.35e12),
    "h200": Card("H200 SXM 141GB", int(140.4 * GiB), 989e12, 4.8e12),
    "a100": Card("A100 SXM 80GB", int(79.2 * GiB), 312e12, 2.04e12),
}


def card(name: str) -> Card:
    key = name.lower().replace(" ", "")
    for k, c in CARDS.items():
        if key.startswith(k):
            return c
    raise KeyError(f"unknown card {name!r}; known: {', '.join(CARDS)}")


@dataclass
class Fit:
    """Whether `bytes_per_rank` fits on a card, and the room left under its usable memory."""

    card: str
    memory_gb: float  # GiB the card has
    usable_gb: float  # minus the reserve
    fits: bool
    headroom_gb: float  # usable - planned (negative: short by that much)

    @classmethod
    def of(cls, c: Card, bytes_per_rank: int, reserve: float = RESERVE) -> "Fit":
        usable = c.usable(reserve)
        return cls(c.name, round(c.memory / GiB, 1), round(usable / GiB, 1), bytes_per_rank <= usable,
                   round((usable - bytes_per_rank) / GiB, 2))
