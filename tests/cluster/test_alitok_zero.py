"""AliTok stage 1 under DeepSpeed ZeRO (one gloo rank): the codebook's clustering re-initialisation
runs inside the forward (ZeRO-3 has the codebook gathered there: the method registers it as an
external parameter), survives the optimiser steps (it moves a buffer the optimiser's own copy of
the weights cannot overwrite), and the export folds it in."""
from __future__ import annotations

import pytest
import torch

from cluster.engine import DeepSpeedStrategy
from system.config import AliTokStage1Config, DeepSpeedConfig, OptimConfig
from system.methods.alitok import AliTokStage1
from system.methods.base import DataSpec
from system.models.artifacts import save_export
from system.models.tokenizers import load_tokenizer


@pytest.mark.parametrize("stage", [2, 3])
def test_codebook_reinit_survives_zero_steps_and_exports(stage, dist_world1, tmp_path):
    torch.manual_seed(0)
    m = AliTokStage1(AliTokStage1Config(tokenizer="debug-tiny-causal", lpips=0.0, convnext=0.0, gan=0.0), DataSpec(32, 1))
    s = DeepSpeedStrategy(DeepSpeedConfig(zero_stage=stage), OptimConfig(lr=1e-3), torch.device("cpu"),
                          micro_batch_size=4, world_size=1)
    module = m.modules()["gen"].module
    engine = s.prepare(module, lr=1e-3, betas=(0.9, 0.95), external=m.external_parameters("gen", module))
    q = engine.module.tokenizer.quantizer
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
        out = m.step("gen", {"gen": engine.module}, {"image": x}, i, {})
        assert all(torch.isfinite(v) for v in out.metrics.values())
        s.backward(engine, out.loss)
        s.step(engine)
        offset = q.code_offset.clone()
        assert offset.abs().sum() > 0  # the re-initialisation moved codes, and no optimiser step undid it
    with s.gathered(engine) as mod:
        weight = mod.tokenizer.quantizer.embedding.weight.detach().clone()
        arts = m.artifacts({"gen": mod})
    save_export(str(tmp_path), arts)
    tok = load_tokenizer(str(tmp_path))
    torch.testing.assert_close(tok.codebook, weight + offset)
