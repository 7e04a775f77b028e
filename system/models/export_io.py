"""Load the consolidated weights a training run exports (no DeepSpeed needed).

A run's `export/` folder (local or s3://) holds `<part>.safetensors` (and `<part>_ema.safetensors`
when EMA was kept) plus `model.json` with each part's model config, e.g. {"tokenizer": {...},
"ar": {...}}, and the resolved `config.yaml`.
"""
from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes

from system.config.schema import StorageConfig
from system.data.storage import exists, join, read_bytes
from system.models.gpt import GPT, GPTConfig
from system.models.quantizers import QuantizerConfig
from system.models.tokenizer1d import Tokenizer1D, Tokenizer1DConfig

MODEL_JSON = "model.json"


def write_model_json(parts: dict[str, Any]) -> bytes:
    return json.dumps(parts, indent=1, sort_keys=True).encode()


def read_model_json(export_url: str, storage: StorageConfig | None = None) -> dict[str, dict]:
    url = join(export_url, MODEL_JSON)
    try:
        return json.loads(read_bytes(url, storage))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} not found: is {export_url} the export/ folder of a finished run?") from None


def load_part(export_url: str, part: str, storage: StorageConfig | None = None, ema: bool = True) -> dict[str, torch.Tensor]:
    """State dict of one exported part; the EMA copy when present and `ema`."""
    names = [f"{part}_ema.safetensors", f"{part}.safetensors"] if ema else [f"{part}.safetensors"]
    for name in names:
        url = join(export_url, name)
        if exists(url, storage):
            return load_safetensors_bytes(read_bytes(url, storage))
    raise FileNotFoundError(f"no {' or '.join(names)} under {export_url}")


def tokenizer_from_dict(d: dict) -> Tokenizer1DConfig:
    d = dict(d)
    d["quantizer"] = QuantizerConfig(**d["quantizer"])
    return Tokenizer1DConfig(**d)


def load_tokenizer_ar(
    export_url: str, storage: StorageConfig | None = None, ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[Tokenizer1D, GPT]:
    """(tokenizer, AR model) of an exported 1D-tokenizer run (EOSTok, AliTok), in eval mode."""
    cfgs = read_model_json(export_url, storage)
    tok = Tokenizer1D(tokenizer_from_dict(cfgs["tokenizer"]))
    ar = GPT(GPTConfig(**cfgs["ar"]))
    tok.load_state_dict(load_part(export_url, "tokenizer", storage, ema))
    ar.load_state_dict(load_part(export_url, "ar", storage, ema))
    return tok.to(device).eval(), ar.to(device).eval()
