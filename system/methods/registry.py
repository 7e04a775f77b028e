"""name -> (config type, method class, data source). The training driver finds a job's method from
the type of its `method` section, and the data it trains on from the method's entry (image shards
by default, token shards, a latent cache, rollouts: system/data/sources.py). Adding a method is a
config dataclass, a file implementing `system.methods.base.Method`, and one `register` call (no
edit under cluster/)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Optional

from system.data.sources import ImageShards, SourceFactory
from system.methods.base import Method


@dataclass(frozen=True)
class Entry:
    name: str
    config: type
    method: type[Method]
    source: SourceFactory = field(default_factory=ImageShards)  # what the method trains on


_BY_NAME: dict[str, Entry] = {}
_UNAVAILABLE: dict[str, str] = {}  # built-in method -> why it cannot be used here (an extra not installed)


def register(name: str, config: type, method: type[Method], source: Optional[SourceFactory] = None) -> type[Method]:
    """Register `method` (a `Method` subclass) for configs of type `config`, trained on `source`
    (default: image shards); returns `method`."""
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise TypeError(f"{method!r} is not a system.methods.base.Method subclass")
    source = source if source is not None else ImageShards()
    if not isinstance(source, SourceFactory):
        raise TypeError(f"source {source!r} of method {name!r} is not a system.data.sources.SourceFactory")
    old = _BY_NAME.get(name)
    if old is not None and (old.config, old.method) != (config, method):
        raise ValueError(f"method name {name!r} is already registered for {old.method.__qualname__}")
    _BY_NAME[name] = Entry(name, config, method, source)
    method.Config = config
    return method


# the built-in methods, imported on first use (each module registers itself) in this order, so a job
# imports only the modules up to its own: SemTok's pulls diffusers (about 5 s in every process, each
# rank included), and comes last
BUILTIN: tuple[str, ...] = ("system.methods.eostok", "system.methods.ar", "system.methods.alitok",
                            "system.methods.vapi", "system.methods.semtok")
_imported: set[str] = set()


def _builtin(until=lambda: False) -> None:
    """Import the built-in method modules not yet imported, in order, stopping once `until()` holds."""
    for module in BUILTIN:
        if until():
            return
        if module in _imported:
            continue
        _imported.add(module)
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:  # diffusers (the `semtok` extra) is not installed
            if module != "system.methods.semtok" or e.name != "diffusers":
                raise
            _UNAVAILABLE["semtok"] = str(e)


def _not_found(what: str) -> str:
    why = "".join(f"; {name} is unavailable: {reason}" for name, reason in sorted(_UNAVAILABLE.items()))
    return f"{what}; registered: {', '.join(sorted(_BY_NAME))}{why}"


def get(name: str) -> Entry:
    _builtin(until=lambda: name in _BY_NAME)
    if name not in _BY_NAME:
        if name in _UNAVAILABLE:
            raise ModuleNotFoundError(f"method {name!r}: {_UNAVAILABLE[name]}", name="diffusers")
        raise KeyError(_not_found(f"no method named {name!r}"))
    return _BY_NAME[name]


def _by_config(method_cfg: object) -> Optional[Entry]:
    return next((e for e in _BY_NAME.values() if type(method_cfg) is e.config), None)


def for_config(method_cfg: object) -> Entry:
    """The registered entry whose config type is exactly `type(method_cfg)`."""
    _builtin(until=lambda: _by_config(method_cfg) is not None)
    entry = _by_config(method_cfg)
    if entry is None:
        raise KeyError(_not_found(f"no method registered for config type {type(method_cfg).__name__}"))
    return entry


def names() -> list[str]:
    _builtin()
    return sorted(_BY_NAME)
