"""EOSTok's step on a tiny model: finite terms, gradients reach every part, NTP path."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from system.config import EOSTokConfig, LPIPSConfig, ModelConfig, TeacherConfig
from system.methods.base import DataSpec
from system.methods.eostok import EOSTok

NUM_CLASSES = 5


def _method(**weights) -> EOSTok:
    weights.setdefault("repa", 0.5)
    cfg = EOSTokConfig(
        model=ModelConfig(tokenizer="debug-tiny", ar="debug-tiny"),
        teacher=TeacherConfig(kind="dinov2", random_init=True, tiny=True, image_size=28),
        lpips_net=LPIPSConfig(random_init=True), **weights,
    )
    return EOSTok(cfg, DataSpec(resolution=32, num_classes=NUM_CLASSES))


def _batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(b, 3, 32, 32, generator=g) * 2 - 1, "label": torch.randint(0, NUM_CLASSES, (b,), generator=g)}


def _grad_norm(module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_every_term_finite_and_gradients_reach_all_parts():
    torch.manual_seed(0)
    m = _method()
    gen, disc = m.build_generator(), m.build_discriminator()
    out = m.generator_step(gen, disc, _batch(), step=10)
    expected = {"l2", "lpips", "ntp", "apr_l2", "apr_lpips", "align", "repa", "gan_g"}
    assert expected <= {k.split("/", 1)[1] for k in out.metrics if k.startswith("loss/")}
    assert all(torch.is_tensor(v) and torch.isfinite(v) for v in out.metrics.values())  # on device: no host sync
    for k in ("ar_acc", "codebook_usage", "codebook_perplexity", "psnr"):
        assert k in out.metrics
    out.loss.backward()
    tok = gen.tokenizer
    assert _grad_norm(tok.encoder) > 0
    assert tok.quantizer.codebook.grad is not None and tok.quantizer.codebook.grad.abs().sum() > 0
    assert _grad_norm(gen.ar) > 0
    assert _grad_norm(tok.decoder) > 0
    assert _grad_norm(gen.align) > 0 and _grad_norm(gen.repa) > 0
    assert all(p.grad is None for p in disc.parameters()), "generator step must not touch D's grads"
    d = m.step("disc", {"disc": disc}, _batch(), 10, out.aux)
    d.loss.backward()
    assert _grad_norm(disc) > 0


def _encoder_grad_from_ntp_only(detach: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    zero = dict(l2=0.0, lpips=0.0, gan=0.0, apr_l2=0.0, apr_lpips=0.0, align=0.0, repa=0.0)
    m = _method(ntp=1.0, detach_ar_input=detach, **zero)
    m.tok_cfg = dataclasses.replace(m.tok_cfg, quantizer=dataclasses.replace(
        m.tok_cfg.quantizer, commit_weight=0.0, entropy_weight=0.0, codebook_weight=0.0, double_weight=0.0))
    gen = m.build_generator()
    torch.nn.init.normal_(gen.ar.output.weight, std=0.02)  # LlamaGen zero-inits it: no input gradient at step 0
    out = m.generator_step(gen, None, _batch(), step=0)
    out.loss.backward()
    return _grad_norm(gen.tokenizer.encoder), float(gen.tokenizer.quantizer.codebook.grad.abs().sum())


def test_ntp_reaches_encoder_only_through_differentiable_embedding():
    enc, cb = _encoder_grad_from_ntp_only(detach=False)
    assert enc > 0 and cb > 0, "NTP must reach the encoder and codebook through probs @ codebook"
    enc_d, cb_d = _encoder_grad_from_ntp_only(detach=True)
    assert enc_d == 0.0, "with the AR input detached (two-stage), NTP must not reach the encoder"
    assert cb_d > 0, "the codebook still gets NTP gradient through the AR's embedding of it"


def test_ablation_rows_are_configs():
    m = _method(ntp=0.0, apr_l2=0.0, apr_lpips=0.0, align=0.0, repa=0.0, gan=0.0)
    assert m.teacher is None and m.build_discriminator() is None
    out = m.generator_step(m.build_generator(), None, _batch(), step=0)
    keys = {k for k in out.metrics if k.startswith("loss/")}
    assert not keys & {"loss/ntp", "loss/apr_l2", "loss/align", "loss/gan_g"}


def test_lpips_without_weights_is_a_clear_error():
    cfg = EOSTokConfig(model=ModelConfig(tokenizer="debug-tiny", ar="debug-tiny"), align=0.0, repa=0.0)
    with pytest.raises(ValueError, match="lpips_net.vgg_path"):
        EOSTok(cfg, DataSpec(resolution=32, num_classes=3))


def test_sample_images_and_export():
    torch.manual_seed(0)
    m = _method(align=0.0, repa=0.0)
    gen = m.build_generator()
    rows = m.sample_images({"gen": gen}, _batch(3), seed=1)
    assert set(rows) == {"original", "reconstruction", "ar_sample"}
    assert all(v.shape == (3, 3, 32, 32) for v in rows.values())
    ex = m.artifacts({"gen": gen})
    assert set(ex) == {"tokenizer", "ar"} and ex["ar"].state_dict
    assert (ex["tokenizer"].kind, ex["ar"].kind) == ("tokenizer1d", "gpt")
    assert ex["ar"].config["vocab_size"] == ex["tokenizer"].config["quantizer"]["codebook_size"]


def test_modules_phases_and_registry():
    from system.methods import registry

    m = _method()
    specs = m.modules()
    assert m.phases() == ["gen", "disc"] and set(specs) == {"gen", "disc"}
    assert specs["gen"].ema_decay == m.cfg.ema_decay and specs["disc"].lr == m.cfg.disc_lr
    assert registry.for_config(m.cfg).method is EOSTok and registry.get("eostok").config is EOSTokConfig
    assert _method(gan=0.0).phases() == ["gen"]


def test_bad_model_name_names_the_key():
    with pytest.raises(ValueError, match="method.model"):
        EOSTok.check(EOSTokConfig(model=ModelConfig(tokenizer="nope")), DataSpec(32, 3))
