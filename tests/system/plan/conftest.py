"""Every registered method's tiny config (the configs/experiments/*_tiny*.yaml presets, loaded as their
jobs and pipelines load them) with its DataSpec, and real tiny exports for the methods that read an
earlier step's export (AliTok / SemTok stage 2, VAπ, AR with a tokenizer)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from system.config import EOSTokExperiment, VapiExperiment, load_config
from system.data.sources import DataSpec, TokenSpec
from system.models.artifacts import save_export

CLASSES = 10


@dataclass
class Case:
    exp: Any
    data: DataSpec


def _export(method_cls: type, exp: Any, data: DataSpec, url: str) -> str:
    torch.manual_seed(0)
    method = method_cls(exp.method, data)
    mods = {n: s.module for n, s in method.modules().items()}
    return save_export(url, method.artifacts(mods))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Case]:
    """name -> Case for every registered method, at its tiny preset; exports written under a tmp folder."""
    from system.methods.alitok import AliTokStage1
    from system.methods.eostok import EOSTok
    from system.methods.semtok import LatentVAEMethod, SemTokStage1
    from system.pipelines.alitok import ALITOK
    from system.pipelines.semtok import SEMTOK

    root = tmp_path_factory.mktemp("exports")
    out: dict[str, Case] = {}
    eostok = load_config(EOSTokExperiment, ["--config", "configs/experiments/eostok_tiny.yaml"],
                         ["base.yaml", "data/imagenet.yaml", "model/eostok_h.yaml"])
    out["eostok"] = Case(eostok, DataSpec(resolution=eostok.data.resolution, num_classes=CLASSES))
    eostok_export = _export(EOSTok, eostok, out["eostok"].data, str(root / "eostok"))

    alitok = ALITOK.load(["--config", "configs/experiments/alitok_tiny.yaml", f"storage_path={root}"])
    images = DataSpec(resolution=alitok.stage1.data.resolution, num_classes=CLASSES)
    out["alitok_stage1"] = Case(alitok.stage1, images)
    _export(AliTokStage1, alitok.stage1, images, alitok.stage2.method.stage1_export)
    out["alitok_stage2"] = Case(alitok.stage2, images)

    semtok = SEMTOK.load(["--config", "configs/experiments/semtok_tiny.yaml", f"storage_path={root}"])
    images = DataSpec(resolution=semtok.stage1.data.resolution, num_classes=CLASSES)
    out["latent_vae"] = Case(semtok.vae, images)
    _export(LatentVAEMethod, semtok.vae, images, semtok.stage1.method.vae.export)
    out["semtok_stage1"] = Case(semtok.stage1, images)
    _export(SemTokStage1, semtok.stage1, images, semtok.stage2.method.stage1_export)
    out["semtok_stage2"] = Case(semtok.stage2, images)
    bits = 18  # semtok-tiny's BSQ codes
    out["masked_ar"] = Case(semtok.ar, DataSpec(num_classes=CLASSES, tokens=TokenSpec(seq_len=32, vocab_size=1 << bits)))

    ar = alitok.ar
    ar.method.tokenizer_export = None
    seq, vocab = alitok_codes(alitok)
    out["ar"] = Case(ar, DataSpec(num_classes=CLASSES, tokens=TokenSpec(seq_len=seq, vocab_size=vocab)))

    vapi = load_config(VapiExperiment, ["--config", "configs/experiments/vapi_tiny.yaml", f"method.export_url={eostok_export}"],
                       ["data/imagenet.yaml", "experiments/vapi.yaml"])
    out["vapi"] = Case(vapi, DataSpec(resolution=vapi.data.resolution, num_classes=CLASSES))
    return out


def alitok_codes(cfg: Any) -> tuple[int, int]:
    """(codes per image, vocabulary) of the AliTok tiny tokenizer: what its token shards hold."""
    from system.methods.alitok import stage1_tokenizer_config

    tok = stage1_tokenizer_config(cfg.stage1.method, cfg.stage1.data.resolution)
    return tok.seq_len, tok.quantizer.num_codes
