"""Plan mode for weight loaders: build every architecture at its configured size without reading a
weight file (a dry run plans paper-size jobs on a laptop, before the weights exist or can be reached).

Every loader of weights from a path, a hub name or an export asks `need(what, where)` before it
reads: outside `planning()` it returns True (load as usual); inside, it records the reference
(`WeightRef`: what, where, whether it exists where that is cheap to check) and returns False, and
the loader builds the same architecture with placeholder weights instead (configs such as a
checkpoint's config.json or an export's model.json may still be read: they are not weights).

    with planning() as refs:
        method = Method(cfg, data)      # teachers, LPIPS, VAE, exports: architectures only
    refs  # [WeightRef(what="DINOv2 teacher", where="facebook/dinov2-base", exists=None), ...]
"""
from __future__ import annotations

import contextvars
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

_REFS: contextvars.ContextVar[Optional[list["WeightRef"]]] = contextvars.ContextVar("planned_weights", default=None)
_UNSET_RAISES: contextvars.ContextVar[bool] = contextvars.ContextVar("unset_weights_raise", default=False)


@dataclass(frozen=True)
class WeightRef:
    """A weight source a real run will read."""

    what: str  # e.g. "LPIPS VGG16", "SemTok stage I export"
    where: str  # local path, URL (s3://...) or hub name ("hub:<name>")
    exists: Optional[bool]  # local paths: checked; object storage and hub names: None (not checked)

    def as_dict(self) -> dict:
        return {"what": self.what, "where": self.where, "exists": self.exists}


def planning_now() -> bool:
    """True inside `planning()`."""
    return _REFS.get() is not None


def _exists(where: str) -> Optional[bool]:
    if where.startswith("hub:") or "://" in where and not where.startswith("file://"):
        return None
    return os.path.exists(where[len("file://"):] if where.startswith("file://") else where)


def need(what: str, where: str, hub: bool = False) -> bool:
    """Whether the caller should read the weights of `what` at `where` now: True outside plan mode;
    in plan mode the reference is recorded and False returned (build the architecture only).
    `hub`: `where` is a hub name (recorded as "hub:<name>", not checked)."""
    refs = _REFS.get()
    if refs is None:
        return True
    where = f"hub:{where}" if hub else str(where)
    ref = WeightRef(what, where, _exists(where))
    if ref not in refs:
        refs.append(ref)
    return False


@contextmanager
def planning(unset_raises: Optional[bool] = None) -> Iterator[list[WeightRef]]:
    """Plan mode for the loaders called inside (nestable: an inner block records into its own list
    and the outer one). `unset_raises=True`: weights a config has not set at all are still config
    errors (`unset`), as in a real run (its pre-run checks); None keeps the enclosing block's."""
    outer = _REFS.get()
    refs: list[WeightRef] = []
    token = _REFS.set(refs)
    strict = _UNSET_RAISES.set(bool(unset_raises)) if unset_raises is not None else None
    try:
        yield refs
    finally:
        _REFS.reset(token)
        if strict is not None:
            _UNSET_RAISES.reset(strict)
        if outer is not None:
            outer.extend(r for r in refs if r not in outer)


def unset(what: str, keys: str, message: str, error: type[Exception] = ValueError) -> None:
    """Weights a config has not given yet (e.g. no LPIPS path): outside plan mode a ValueError with
    `message` (the config error a real run stops on); in plan mode recorded as needed
    (`where`: "<not set: keys>", `exists` False) so the dry run goes on with placeholder weights
    and its table says which keys a real run must set. Inside `planning(unset_raises=True)` (the
    checks a real run does before its first step) it raises as outside."""
    refs = _REFS.get()
    if refs is None or _UNSET_RAISES.get():
        raise error(message)
    ref = WeightRef(what, f"<not set: {keys}>", False)
    if ref not in refs:
        refs.append(ref)
