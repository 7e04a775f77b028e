"""Fixtures for job tests: a tiny exported run (tokenizer + AR) as a training job writes it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "jobs") not in sys.path:
    sys.path.insert(0, str(ROOT / "jobs"))


def make_export(folder: Path, num_classes: int = 8, seed: int = 0) -> Path:
    """Random-weight debug-tiny tokenizer (32 px, 16 codes of a 64-entry codebook) and a matching AR
    model in `folder` (tokenizer.safetensors, ar.safetensors, model.json); returns `folder`."""
    from system.models.artifacts import Artifact, save_export
    from system.models.gpt import GPT
    from system.models.registry import gpt_config
    from system.models.tokenizer1d import Tokenizer1D, tokenizer_config

    torch.manual_seed(seed)
    tok_cfg = tokenizer_config("debug-tiny")
    ar_cfg = gpt_config(
        "debug-tiny", vocab_size=tok_cfg.quantizer.codebook_size, block_size=tok_cfg.seq_len,
        code_dim=tok_cfg.latent_dim, num_classes=num_classes,
    )
    tok, ar = Tokenizer1D(tok_cfg), GPT(ar_cfg)
    torch.nn.init.normal_(ar.output.weight, std=0.5)  # the zero-initialised head would sample uniformly
    save_export(str(folder), {"tokenizer": Artifact.of("tokenizer1d", tok), "ar": Artifact.of("gpt", ar)})
    return folder


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """A tiny exported run: <tmp>/run/export (8 classes)."""
    return make_export(tmp_path_factory.mktemp("run") / "export")
