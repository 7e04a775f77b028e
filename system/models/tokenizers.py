"""Tokenizer kinds: kind -> how an exported part is rebuilt as a frozen `Tokenizer`, and the loader.

The built-in kinds come from their adapters, each next to its model (a `FrozenTokenizer` subclass
naming its `kind`, the model class it `wraps` and `from_export`): "tokenizer1d" (ours: EOSTok,
AliTok; system/models/tokenizer1d.py), "llamagen-vq" (LlamaGen's VQ-16/VQ-8;
system/models/adapters_vq.py), "semtok" (system/models/semtok.py) and "alitok-released" (AliTok's
released tokenizer in its official layout, read into a tokenizer1d; system/models/adapters_alitok.py).
A new built-in adapter is one
line in `BUILTIN`; a kind from outside system/ plugs in with `register_tokenizer`. Generator kinds
(they sample) are one layer up: system/sampling/generators.py.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from system.config import StorageConfig
from system.models.adapters_alitok import AliTokReleasedTokenizer
from system.models.adapters_vq import VQFrozen
from system.models.artifacts import FrozenTokenizer, Tokenizer, build_part, register_kind
from system.models.semtok import SemTokFrozen
from system.models.tokenizer1d import Tokenizer1DFrozen

TokenizerBuilder = Callable[[dict, dict[str, Tensor]], Tokenizer]  # (config, state_dict) -> Tokenizer

BUILTIN: tuple[type, ...] = (Tokenizer1DFrozen, VQFrozen, SemTokFrozen, AliTokReleasedTokenizer)
_TOKENIZERS: dict[str, TokenizerBuilder] = {a.kind: a.from_export for a in BUILTIN}
# raw model class -> its frozen adapter (kinds that only read another layout into one of ours have wraps None)
_FROZEN_ADAPTERS: dict[type, type[FrozenTokenizer]] = {a.wraps: a for a in BUILTIN if a.wraps is not None}


def register_tokenizer(kind: str, builder: TokenizerBuilder) -> None:
    """builder(config dict, state_dict) -> Tokenizer (a frozen nn.Module adapter)."""
    register_kind(_TOKENIZERS, "tokenizer", kind, builder)


def tokenizer_kinds() -> list[str]:
    return sorted(_TOKENIZERS)


def frozen_tokenizer(model: nn.Module) -> FrozenTokenizer:
    """A raw tokenizer model (Tokenizer1D, VQModel, SemTok) -> its frozen adapter (adapters pass through)."""
    if isinstance(model, FrozenTokenizer):
        return model
    for cls, adapter in _FROZEN_ADAPTERS.items():
        if isinstance(model, cls):
            return adapter(model)
    raise TypeError(f"no tokenizer adapter for {type(model).__name__}; expected one of "
                    f"{[c.__name__ for c in _FROZEN_ADAPTERS]}")


def load_tokenizer(export_url: str, storage: Optional[StorageConfig] = None, ema: bool = True,
                   device: str | torch.device = "cpu", part: str = "tokenizer") -> Tokenizer:
    """The frozen tokenizer of an export (EMA weights when present and `ema`)."""
    return build_part(_TOKENIZERS, "tokenizer", export_url, part, storage, ema).to(device)
