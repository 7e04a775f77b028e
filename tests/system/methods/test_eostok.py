"""EOSTok's step on a tiny model: finite terms, gradients reach every part, NTP path, the
AR input choices, and the ablation rows as configs."""
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
    weights.setdefault("model", ModelConfig(tokenizer="debug-tiny", ar="debug-tiny"))
    cfg = EOSTokConfig(
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


def _ntp_only_grads(detach: bool, ar_input: str = "codebook") -> dict[str, float]:
    """Abs-sum of the gradients an NTP-only loss leaves on the encoder, the codebook and the AR's
    input table (code_proj for the codebook input, its own E for the table input)."""
    torch.manual_seed(0)
    zero = dict(l2=0.0, lpips=0.0, gan=0.0, apr_l2=0.0, apr_lpips=0.0, align=0.0, repa=0.0)
    m = _method(ntp=1.0, detach_ar_input=detach, model=ModelConfig(tokenizer="debug-tiny", ar="debug-tiny",
                                                                   ar_input=ar_input), **zero)
    m.tok_cfg = dataclasses.replace(m.tok_cfg, quantizer=dataclasses.replace(
        m.tok_cfg.quantizer, commit_weight=0.0, entropy_weight=0.0, codebook_weight=0.0, double_weight=0.0))
    gen = m.build_generator()
    torch.nn.init.normal_(gen.ar.output.weight, std=0.02)  # LlamaGen zero-inits it: no input gradient at step 0
    out = m.generator_step(gen, None, _batch(), step=0)
    out.loss.backward()
    cb = gen.tokenizer.quantizer.codebook.grad
    table = gen.ar.code_proj if ar_input == "codebook" else gen.ar.tok_embeddings
    return {"encoder": _grad_norm(gen.tokenizer.encoder), "codebook": 0.0 if cb is None else float(cb.abs().sum()),
            "tokenizer": _grad_norm(gen.tokenizer), "ar_table": _grad_norm(table)}


@pytest.mark.parametrize("ar_input", ["codebook", "table"])
def test_ntp_reaches_tokenizer_only_through_differentiable_embedding(ar_input):
    g = _ntp_only_grads(detach=False, ar_input=ar_input)
    assert g["encoder"] > 0 and g["codebook"] > 0 and g["ar_table"] > 0, g  # "table": through Ind = f(z @ codebook^T)
    d = _ntp_only_grads(detach=True, ar_input=ar_input)
    # the two-stage baseline: not one NTP gradient into the tokenizer, encoder or codebook (the
    # codebook input used to read the live codebook here: 87% of its NTP gradient still arrived)
    assert d["encoder"] == 0.0 and d["codebook"] == 0.0 and d["tokenizer"] == 0.0, d
    assert d["ar_table"] > 0, "the AR's own input path still trains"


def test_ar_input_builds_and_counts_only_the_table_it_reads():
    """"codebook": no own token table; "table": no code_proj and no codebook read by the AR. Every
    AR parameter gets a gradient, so the parameter count is the parameters used, and teacher
    forcing from ids (the sampling path) gives the training path's logits."""
    for ar_input in ("codebook", "table"):
        torch.manual_seed(0)
        m = _method(align=0.0, repa=0.0, lpips=0.0, apr_lpips=0.0, gan=0.0,
                    model=ModelConfig(tokenizer="debug-tiny", ar="debug-tiny", ar_input=ar_input))
        gen = m.build_generator()
        ar = gen.ar
        assert (ar.tok_embeddings is None, ar.code_proj is None) == ((True, False) if ar_input == "codebook" else (False, True))
        torch.nn.init.normal_(ar.output.weight, std=0.02)
        out = m.generator_step(gen, None, _batch(), step=0)
        out.loss.backward()
        unused = [n for n, p in ar.named_parameters() if p.grad is None or not p.grad.any()]
        assert not unused, f"{ar_input}: built but never read: {unused}"
        assert ar.num_params() == sum(p.numel() for p in ar.parameters() if p.grad is not None)
        ar.eval()
        codes, labels = gen.tokenizer.encode(_batch()["image"])[0].codes, _batch()["label"]
        onehot = torch.nn.functional.one_hot(codes, m.tok_cfg.quantizer.codebook_size).float()
        cb = gen.tokenizer.codebook if ar_input == "codebook" else None
        torch.testing.assert_close(ar(codes, labels, codebook=cb), ar(probs=onehot, labels=labels, codebook=cb))


@pytest.mark.parametrize("ar_input", ["codebook", "table"])
def test_export_round_trip_samples_like_training(tmp_path, ar_input):
    from system.models import artifacts as A
    from system.sampling.generators import load_pair

    torch.manual_seed(0)
    m = _method(align=0.0, repa=0.0, lpips=0.0, apr_lpips=0.0,
                model=ModelConfig(tokenizer="debug-tiny", ar="debug-tiny", ar_input=ar_input))
    gen = m.build_generator().eval()
    torch.nn.init.normal_(gen.ar.output.weight, std=0.5)
    A.save_export(str(tmp_path), m.artifacts({"gen": gen}))
    tok, g = load_pair(str(tmp_path))
    assert (g.codebook is None) == (ar_input == "table")
    b = _batch()
    codes, labels = tok.encode(b["image"]), b["label"]
    want = gen(b["image"], labels).logits  # the training path: probs @ (codebook @ P | E)
    torch.testing.assert_close(g(codes, labels), want)
    assert g.sample(labels, seed=1).shape == codes.shape


def test_align_layer_and_targets_route_gradients():
    """Implicit alignment reads encoder block `align_layer` (default: the middle one), so its loss
    reaches that block and the ones below it only; direct alignment reaches the 1D latents' head
    (to_latent); neither touches the quantizer, the decoder or the AR model."""
    zero = dict(l2=0.0, lpips=0.0, gan=0.0, apr_l2=0.0, apr_lpips=0.0, ntp=0.0, repa=0.0)
    for kw, reached, untouched in (
        (dict(), [0], [1]),  # debug-tiny: depth 2, middle block 0
        (dict(align_layer=-1), [0, 1], []),
        (dict(align_target="latents"), [0, 1], []),
    ):
        torch.manual_seed(0)
        m = _method(align=1.0, **kw, **zero)
        m.tok_cfg = dataclasses.replace(m.tok_cfg, quantizer=dataclasses.replace(m.tok_cfg.quantizer, entropy_weight=0.0,
                                        commit_weight=0.0, codebook_weight=0.0, double_weight=0.0))
        gen = m.build_generator()
        out = m.generator_step(gen, None, _batch(), step=0)
        others = {k for k, v in out.metrics.items() if k.startswith("loss/") and v != 0} - {"loss/align", "loss/total"}
        assert torch.isfinite(out.metrics["loss/align"]) and not others, others
        out.loss.backward()
        enc = gen.tokenizer.encoder
        blocks = enc.vit.blocks
        assert all(_grad_norm(blocks[i]) > 0 for i in reached), kw
        assert all(_grad_norm(blocks[i]) == 0 for i in untouched), kw
        assert (_grad_norm(enc.to_latent) > 0) == (kw.get("align_target") == "latents"), kw
        assert _grad_norm(gen.align) > 0
        for part in (gen.tokenizer.quantizer, gen.tokenizer.decoder, gen.ar):
            assert _grad_norm(part) == 0, (kw, type(part).__name__)


def test_direct_substitution_replaces_patch_embeddings():
    torch.manual_seed(0)
    m = _method(substitute_patches=True, align=0.0, repa=0.0, lpips=0.0, apr_lpips=0.0)
    assert m.teacher is not None
    gen, disc = m.build_generator(), m.build_discriminator()
    x = _batch()["image"]
    plain = gen.tokenizer.encode(x)[0].latents
    sub = gen.encode(x, m.teacher(x))[0].latents
    assert not torch.allclose(plain, sub)  # the encoder read the teacher's features
    torch.testing.assert_close(gen.tokenizer.encode(x)[0].latents, plain)  # and only inside encode()
    out = m.generator_step(gen, disc, _batch(), step=10)
    assert all(torch.isfinite(v) for v in out.metrics.values())
    out.loss.backward()
    pe = gen.tokenizer.encoder.patch_embed
    assert all(not p.requires_grad and p.grad is None for p in pe.parameters()), "the pixel patch embedding is unused"
    assert _grad_norm(gen.substitute) > 0 and _grad_norm(gen.tokenizer.encoder.vit) > 0
    assert all(p.grad is None for p in m.teacher.parameters())
    rows = m.sample_images({"gen": gen}, _batch(2), seed=0)
    assert rows["reconstruction"].shape == (2, 3, 32, 32)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="method.align_layer=5 is out of range"):
        _method(align_layer=5)
    with pytest.raises(ValueError, match="method.model.ar_input"):
        _method(model=ModelConfig(tokenizer="debug-tiny", ar="debug-tiny", ar_overrides={"code_dim": 16}))


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


def test_bsq_quantizer_sizes_the_ar_by_its_implicit_codebook():
    """BSQ has 2**dim codes (its codebook_size field is unused): the AR vocabulary, the usage
    histogram and the step follow num_codes (before: the AR got 64 rows of a 1024-row codebook)."""
    torch.manual_seed(0)
    overrides = {"latent_dim": 10, "quantizer": {"type": "bsq", "dim": 10, "entropy_weight": 0.1}}
    m = _method(model=ModelConfig(tokenizer="debug-tiny", ar="debug-tiny", tokenizer_overrides=overrides))
    assert m.ar_cfg.vocab_size == 1024
    gen = m.build_generator()
    out = m.generator_step(gen, None, _batch(), step=0)
    assert torch.isfinite(out.loss) and out.metrics["codebook_usage"] <= 16 * 4 / 1024
    out.loss.backward()
    assert _grad_norm(gen.tokenizer.encoder) > 0


@pytest.mark.parametrize("size, want", [("s", 92.0e6), ("l", 311.4e6), ("h", 641.0e6)])
def test_paper_default_ar_input_is_the_own_table(size, want):
    """The paper's h = Ind^T E embeds through the AR's own table: the default method.model.ar_input,
    with which the S / L / H configs' AR models count 92.0 / 311.4 / 641.0M (published 93 / 312 / 644M)."""
    from system.config import EOSTokExperiment, load_config
    from system.methods.eostok import build_configs
    from system.models.gpt import GPT

    assert ModelConfig().ar_input == "table"
    exp = load_config(EOSTokExperiment, ["run_name=x"], ["base.yaml", "data/imagenet.yaml", f"model/eostok_{size}.yaml"])
    assert exp.method.model.ar_input == "table"
    _, ar_cfg = build_configs(exp.method.model, 256, 1000)
    with torch.device("meta"):
        ar = GPT(ar_cfg)
    assert ar.code_proj is None and ar.num_params() == pytest.approx(want, abs=0.05e6)
