"""Tokenizer kinds: kind -> how an exported part is rebuilt as a frozen `Tokenizer`, and the loader.

The built-in kinds come from their adapters, each next to its model (a `FrozenTokenizer` subclass
naming its `kind`, the model class it `wraps` and `from_export`): "tokenizer1d" (ours: EOSTok,
AliTok; system/models/tokenizer1d.py), "llamagen-vq" (LlamaGen's VQ-16/VQ-8;
system/models/adapters_vq.py), "semtok" (system/models/semtok.py) and "alitok-released" (AliTok's
released tokenizer in its official layout, read into a tokenizer1d; system/models/adapters_alitok.py).
A new built-in adapter is one line in `BUILTIN`; a kind from outside system/ plugs in with
`register_tokenizer`. Generator kinds
(they sample) are one layer up: system/sampling/generators.py.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

import importlib

from system.config import StorageConfig
from system.models.artifacts import FrozenTokenizer, Tokenizer, build_part, register_kind

TokenizerBuilder = Callable[[dict, dict[str, Tensor]], Tokenizer]  # (config, state_dict) -> Tokenizer

# kind -> "module:adapter class"; each is imported on first use, so a process imports only the
# adapters it loads (SemTok's pulls diffusers: about 5 s in every process) and a kind whose optional
# dependency is missing fails only when an export of that kind is loaded, naming the extra.
# `frozen_tokenizer` tries them in this order: SemTok's last.
BUILTIN: dict[str, str] = {"tokenizer1d": "system.models.tokenizer1d:Tokenizer1DFrozen",
                           "llamagen-vq": "system.models.adapters_vq:VQFrozen",
                           "alitok-released": "system.models.adapters_alitok:AliTokReleasedTokenizer",
                           "semtok": "system.models.semtok:SemTokFrozen"}


def _adapter(path: str) -> type[FrozenTokenizer]:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _lazy(path: str) -> TokenizerBuilder:
    def build(config: dict, state_dict: dict[str, Tensor]) -> Tokenizer:
        return _adapter(path).from_export(config, state_dict)

    build.__qualname__ = f"{path}.from_export"
    return build


_TOKENIZERS: dict[str, TokenizerBuilder] = {kind: _lazy(path) for kind, path in BUILTIN.items()}


def register_tokenizer(kind: str, builder: TokenizerBuilder) -> None:
    """builder(config dict, state_dict) -> Tokenizer (a frozen nn.Module adapter)."""
    register_kind(_TOKENIZERS, "tokenizer", kind, builder)


def tokenizer_kinds() -> list[str]:
    return sorted(_TOKENIZERS)


def _wrapping_adapters() -> Iterator[type[FrozenTokenizer]]:
    """The built-in adapters that wrap one of our model classes, imported one by one (in order)."""
    for path in BUILTIN.values():
        try:
            a = _adapter(path)
        except ModuleNotFoundError:  # an optional extra (diffusers): no model of that kind exists here
            continue
        if a.wraps is not None:  # None: a kind that reads another layout into one of our models (alitok-released)
            yield a


def frozen_tokenizer(model: nn.Module) -> FrozenTokenizer:
    """A raw tokenizer model (Tokenizer1D, VQModel, SemTok) -> its frozen adapter (adapters pass through)."""
    if isinstance(model, FrozenTokenizer):
        return model
    for adapter in _wrapping_adapters():
        if isinstance(model, adapter.wraps):
            return adapter(model)
    raise TypeError(f"no tokenizer adapter for {type(model).__name__}; expected one of "
                    f"{[a.wraps.__name__ for a in _wrapping_adapters()]}")


def load_tokenizer(export_url: str, storage: Optional[StorageConfig] = None, ema: bool = True,
                   device: str | torch.device = "cpu", part: str = "tokenizer") -> Tokenizer:
    """The frozen tokenizer of an export (EMA weights when present and `ema`)."""
    return build_part(_TOKENIZERS, "tokenizer", export_url, part, storage, ema).to(device)
