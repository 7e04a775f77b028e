"""Generator kinds: kind -> how an exported part is rebuilt as a `Generator`, and the loaders of
exports (a generator with its tokenizer) and of LlamaGen's public checkpoints.

A generator samples, so its kinds live here, a layer above system/models (tokenizer kinds:
system/models/tokenizers.py). Built in: "gpt" (ours and LlamaGen's c2i GPT after its state-dict
adapter; system/sampling/gpt_generator.py). A new built-in adapter (a class with `kind` and
`from_export(config, state_dict, tokenizer)`) is one line in `BUILTIN`; a kind from outside
system/ plugs in with `register_generator`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from system.config import StorageConfig
from system.models.adapters_alitok import AliTokReleasedTokenizer, load_alitok_gpt, load_alitok_tokenizer, read_checkpoint
from system.models.adapters_llamagen_gpt import load_llamagen_gpt
from system.models.adapters_vq import VQFrozen, load_llamagen_vq
from system.models.artifacts import Artifact, Generator, Tokenizer, build_part, register_kind
from system.models.tokenizer1d import Tokenizer1DFrozen
from system.models.tokenizers import load_tokenizer
from system.sampling.gpt_generator import GPTGenerator


class AliTokReleasedAR:
    """Generator kind "alitok-released": an export part holding an official AliTok AR state dict
    (modeling/ar.py key names); config {"preset": alitok-b/l/xl or null (from the weights),
    "overrides": {GPTConfig fields}}. It loads as our GPT (kind "gpt" when re-exported)."""

    kind = "alitok-released"

    @staticmethod
    def from_export(config: dict, state_dict: dict[str, Tensor], tokenizer: Optional[Tokenizer]) -> GPTGenerator:
        return GPTGenerator(load_alitok_gpt(state_dict, config.get("preset"), **config.get("overrides", {})))


# (config, state_dict, tokenizer or None) -> Generator
GeneratorBuilder = Callable[[dict, dict[str, Tensor], Optional[Tokenizer]], Generator]

BUILTIN = (GPTGenerator, AliTokReleasedAR)
_GENERATORS: dict[str, GeneratorBuilder] = {g.kind: g.from_export for g in BUILTIN}


def register_generator(kind: str, builder: GeneratorBuilder) -> None:
    """builder(config dict, state_dict, tokenizer or None) -> Generator; the tokenizer gives the
    codebook to generators that embed codes through it."""
    register_kind(_GENERATORS, "generator", kind, builder)


def generator_kinds() -> list[str]:
    return sorted(_GENERATORS)


def load_generator(export_url: str, tokenizer: Optional[Tokenizer] = None, storage: Optional[StorageConfig] = None,
                   ema: bool = True, device: str | torch.device = "cpu", part: str = "ar") -> Generator:
    """The generator of an export, in eval mode; `tokenizer` supplies the codebook when the
    generator embeds codes through it (kind "gpt" with code_dim)."""
    return build_part(_GENERATORS, "generator", export_url, part, storage, ema, tokenizer).to(device).eval()


def load_pair(export_url: str, storage: Optional[StorageConfig] = None, ema: bool = True,
              device: str | torch.device = "cpu", tokenizer_part: str = "tokenizer",
              generator_part: str = "ar") -> tuple[Tokenizer, Generator]:
    """(tokenizer, generator) of an export of any registered kinds."""
    tok = load_tokenizer(export_url, storage, ema, device, tokenizer_part)
    return tok, load_generator(export_url, tok, storage, ema, device, generator_part)


def load_llamagen(gpt_path: str | dict, vq_path: str | dict, preset: Optional[str] = None,
                  **gpt_overrides) -> tuple[Tokenizer, Generator]:
    """(tokenizer, generator) from LlamaGen's public checkpoints (paths or loaded dicts), on CPU:
    a VQ (vq_ds16_c2i.pt) and a c2i GPT; `preset` (a llamagen-* name, inferred from the weights
    when None) and `gpt_overrides` (e.g. block_size=576 for 384 px) set the GPTConfig."""
    tok = VQFrozen(load_llamagen_vq(vq_path))
    return tok, GPTGenerator(load_llamagen_gpt(gpt_path, name=preset, **gpt_overrides).eval())


def load_alitok(ar_path: str | dict, tokenizer_path: str | dict, preset: Optional[str] = None,
                **gpt_overrides) -> tuple[Tokenizer, Generator]:
    """(tokenizer, generator) from AliTok's released checkpoints (paths or loaded state dicts), on CPU:
    weights/AliTok.pth and weights/alitok_{b,l,xl}.bin (system/models/adapters_alitok.py)."""
    tok = Tokenizer1DFrozen(load_alitok_tokenizer(tokenizer_path))
    return tok, GPTGenerator(load_alitok_gpt(ar_path, preset, **gpt_overrides))


def released_alitok(ar_path: Optional[str | dict], tokenizer_path: str | dict, preset: Optional[str] = None,
                    **gpt_overrides) -> dict[str, Artifact]:
    """AliTok's released checkpoints as export parts of kind "alitok-released" (the official tensors,
    unchanged, as safetensors; `save_export` writes them), after checking that they load: the
    "tokenizer" and, with `ar_path`, the "ar" part."""
    tok_sd, parts = read_checkpoint(tokenizer_path), {}
    load_alitok_tokenizer(tok_sd)  # every tensor used, none left over
    parts["tokenizer"] = Artifact(AliTokReleasedTokenizer.kind, {}, tok_sd)
    if ar_path is not None:
        ar_sd = read_checkpoint(ar_path)
        load_alitok_gpt(ar_sd, preset, **gpt_overrides)
        parts["ar"] = Artifact(AliTokReleasedAR.kind, {"preset": preset, "overrides": dict(gpt_overrides)}, ar_sd)
    return parts
