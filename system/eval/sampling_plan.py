"""How N = num_per_class x num_classes samples are cut into parts (pure; numpy only).

Image i has class ``i % num_classes`` (classes interleaved, so every contiguous chunk, e.g. an
Inception-Score split, covers the classes evenly). Part p holds images
[p * part_size, min((p + 1) * part_size, N)) and is generated as one batch from its own seed,
derived from (seed, p) alone. So a part's images depend only on (seed, part index) and the
sampling settings: never on which worker made it, how many workers there were, or whether it
was made again after a crash.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np


def part_seed(seed: int, index: int) -> int:
    """63-bit seed of part ``index`` (SeedSequence of (seed, index): independent streams)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and part index must be >= 0; got seed={seed}, index={index}")
    state = np.random.SeedSequence([seed, index]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


@dataclass(frozen=True)
class Part:
    index: int
    start: int  # global index of the part's first image
    labels: tuple[int, ...]  # class of each image, in order
    seed: int

    @property
    def size(self) -> int:
        return len(self.labels)

    @property
    def stop(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class SamplingPlan:
    num_per_class: int
    num_classes: int
    part_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_per_class", "num_classes", "part_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0; got {self.seed}")

    @property
    def total(self) -> int:
        return self.num_per_class * self.num_classes

    @property
    def num_parts(self) -> int:
        return -(-self.total // self.part_size)

    def labels(self) -> np.ndarray:
        """(N,) int64 class of every image."""
        return np.arange(self.total, dtype=np.int64) % self.num_classes

    def part(self, index: int) -> Part:
        if not 0 <= index < self.num_parts:
            raise IndexError(f"part {index} out of range: the plan has {self.num_parts} parts (0..{self.num_parts - 1})")
        start = index * self.part_size
        stop = min(start + self.part_size, self.total)
        labels = tuple(int(c) for c in np.arange(start, stop) % self.num_classes)
        return Part(index=index, start=start, labels=labels, seed=part_seed(self.seed, index))

    def parts(self) -> list[Part]:
        return [self.part(i) for i in range(self.num_parts)]


def fingerprint(record: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able settings record (what decides the parts' content)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def record_mismatch(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two plan records, as 'key: old -> new'."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
