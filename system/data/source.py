"""The one interface every batch source implements (image shards, token shards, rollouts): an
endless iterator of batches whose position is part of a checkpoint."""
from __future__ import annotations

from typing import Any, Iterator


class BatchSource:
    """Base class of batch sources. `state_dict()` after any batch lets a fresh source continue
    with exactly the batches an uninterrupted run would have produced. A source may also accept a
    state saved at another world size (the shard readers do: their state is the same on every
    rank and is re-dealt over the new ranks, see system/data/plan.py)."""

    def __iter__(self) -> Iterator[Any]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """What the source wants in the run's final metrics.json (JSON-able); {} by default."""
        return {}

    def close(self) -> None:
        """Release what the source holds (called once at the end of a training session)."""
