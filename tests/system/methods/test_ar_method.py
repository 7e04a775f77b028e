"""AR methods on token batches (no Ray, no DeepSpeed): `ar` and `masked_ar` steps, the mask, the
bitwise head, config errors, the registry, throughput metrics, export round trips."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from system.config import ARConfig, ConfigError, MaskedARConfig
from system.methods import registry
from system.data.sources import TokenShards, TokenSpec
from system.methods.ar import ARMethod, MaskedARMethod
from system.methods.base import DataSpec

L, V, C = 16, 64, 5  # debug-tiny: 16 tokens (4x4 grid), 64 codes; 5 classes
TINY = {"n_layer": 2, "dim": 64, "n_head": 4, "mlp_multiple_of": 32}  # a semtok-ar preset shrunk to debug size


def spec(seq_len: int = L, vocab: int = V) -> DataSpec:
    return DataSpec(num_classes=C, tokens=TokenSpec(seq_len=seq_len, vocab_size=vocab))


def batch(b: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"codes": torch.randint(0, V, (b, L), generator=g), "label": torch.randint(0, C, (b,), generator=g)}


def build(method_cls, cfg, data=None):
    m = method_cls(cfg, data or spec())
    model = m.modules()["ar"].module
    with torch.no_grad():  # zero-initialised head / AdaLN gates: no gradient below them at init
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return m, model


def grads_everywhere(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


def test_next_token_step_shapes_metrics_and_gradients():
    torch.manual_seed(0)
    m, model = build(ARMethod, ARConfig(model="debug-tiny", ema_decay=0.99))
    assert m.phases() == ["ar"] and m.modules()["ar"].ema_decay == 0.99
    assert (model.cfg.vocab_size, model.cfg.block_size, model.cfg.num_classes) == (V, L, C)
    assert not model.cfg.bidirectional and model.cfg.code_dim is None
    out = m.step("ar", {"ar": model}, batch(), 0, {})
    assert out.loss.ndim == 0 and math.isfinite(out.loss.item())
    assert abs(out.loss.item() - math.log(V)) < 0.5  # about uniform at init
    assert set(out.metrics) == {"acc"} and 0 <= float(out.metrics["acc"]) <= 1
    out.loss.backward()
    assert grads_everywhere(model) == []


def test_next_token_loss_is_teacher_forced_cross_entropy():
    torch.manual_seed(0)
    m, model = build(ARMethod, ARConfig(model="debug-tiny", class_dropout=0.0))
    model.eval()
    b = batch()
    logits, ce = model(b["codes"], b["label"], targets=b["codes"])
    out = m.step("ar", {"ar": model}, b, 0, {})
    assert torch.allclose(out.loss, ce, atol=1e-6)
    assert float(out.metrics["acc"]) == pytest.approx(float((logits.argmax(-1) == b["codes"]).float().mean()))


def test_label_smoothing_changes_the_loss():
    torch.manual_seed(0)
    b = batch()
    losses = []
    for ls in (0.0, 0.1):
        torch.manual_seed(0)
        m, model = build(ARMethod, ARConfig(model="debug-tiny", class_dropout=0.0, label_smoothing=ls))
        model.eval()
        losses.append(m.step("ar", {"ar": model}, b, 0, {}).loss.item())
    assert losses[0] != losses[1]


def test_mask_ratio_per_sample_in_range_and_random_order():
    torch.manual_seed(0)
    m = MaskedARMethod(MaskedARConfig(model="debug-tiny"), spec())
    codes = torch.zeros(4000, L, dtype=torch.long)
    mask = m.token_mask(codes)
    count = mask.sum(-1)
    assert int(count.min()) >= math.ceil(0.7 * L) and int(count.max()) <= L
    assert 0.8 < float(mask.float().mean()) < 0.9  # E[ceil(r L)] / L for r ~ U[0.7, 1]
    assert len(set(count.tolist())) >= 4  # the ratio varies per sample
    assert float(mask.float().mean(0).min()) > 0.7  # every position gets masked (random order)
    full = MaskedARMethod(MaskedARConfig(model="debug-tiny", mask_min=1.0, mask_max=1.0), spec())
    assert bool(full.token_mask(codes[:8]).all())
    low = MaskedARMethod(MaskedARConfig(model="debug-tiny", mask_min=0.01, mask_max=0.01), spec())
    assert low.token_mask(codes[:8]).sum(-1).tolist() == [1] * 8  # at least one position


def test_masked_step_counts_only_masked_positions():
    torch.manual_seed(0)
    m, model = build(MaskedARMethod, MaskedARConfig(model="debug-tiny", label_smoothing=0.0, class_dropout=0.0))
    assert model.cfg.bidirectional and model.cfg.head == "softmax"
    model.eval()
    b = batch()
    mask = torch.zeros(4, L, dtype=torch.bool)
    mask[:, :5] = True
    m.token_mask = lambda codes: mask
    out = m.step("ar", {"ar": model}, b, 0, {})
    logits = model(b["codes"], b["label"], token_mask=mask)
    assert torch.allclose(out.loss, model.loss(logits, b["codes"], mask), atol=1e-6)
    assert float(out.metrics["mask_ratio"]) == pytest.approx(5 / L)
    model.train()
    out = m.step("ar", {"ar": model}, b, 0, {})
    out.loss.backward()
    assert model.mask_embedding.grad is not None and float(model.mask_embedding.grad.abs().sum()) > 0


def test_bitwise_head_semtok_preset():
    torch.manual_seed(0)
    cfg = MaskedARConfig(model="semtok-ar-l", overrides=TINY)
    m, model = build(MaskedARMethod, cfg)
    c = model.cfg
    assert (c.head, c.n_bits, c.vocab_size, c.adaln, c.bidirectional) == ("bitwise", 6, V, True, True)
    b = batch()
    assert model(b["codes"], b["label"]).shape == (4, L, 6, 2)
    out = m.step("ar", {"ar": model}, b, 0, {})
    assert {"acc", "bit_acc", "mask_ratio"} == set(out.metrics)
    assert abs(out.loss.item() - math.log(2)) < 0.2  # per-bit binary cross-entropy near chance
    assert 0 <= float(out.metrics["acc"]) <= float(out.metrics["bit_acc"]) <= 1
    out.loss.backward()
    assert grads_everywhere(model) == []


@pytest.mark.parametrize("method_cls, cfg, data, key", [
    (ARMethod, ARConfig(model="llamagen-q"), spec(), "method.model"),
    (ARMethod, ARConfig(model="debug-tiny", overrides={"vocab_size": 10}), spec(), "method.overrides"),
    (ARMethod, ARConfig(model="debug-tiny", overrides={"n_layr": 2}), spec(), "method.overrides.n_layr"),
    (ARMethod, ARConfig(model="semtok-ar-l"), spec(), "objective=masked_ar"),
    (MaskedARMethod, MaskedARConfig(model="semtok-ar-l", overrides=TINY), spec(vocab=100), "head=softmax"),
    (ARMethod, ARConfig(model="debug-tiny"), spec(seq_len=15), "rope"),
    (ARMethod, ARConfig(model="alitok-b"), spec(seq_len=16), "prefix_tokens"),
    (MaskedARMethod, MaskedARConfig(model="debug-tiny", mask_min=0.9, mask_max=0.8), spec(), "method.mask_min"),
    (ARMethod, ARConfig(model="debug-tiny", tokenizer_export="/nonexistent/export"), spec(), "method.tokenizer_export"),
])
def test_config_errors_name_the_key(method_cls, cfg, data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        method_cls.check(cfg, data)


def test_alitok_prefix_tokens_leave_block_for_the_grid():
    m = ARMethod(ARConfig(model="alitok-b", overrides={**TINY, "n_head": 4}), spec(seq_len=16 + 16))
    assert (m.gpt_cfg.prefix_tokens, m.gpt_cfg.block_size, m.gpt_cfg.seq_len) == (16, 16, 32)


def test_registry_names_both_methods():
    assert {"ar", "masked_ar"} <= set(registry.names())
    assert registry.get("ar").method is ARMethod and registry.get("masked_ar").method is MaskedARMethod
    assert registry.for_config(ARConfig()).name == "ar" and registry.for_config(MaskedARConfig()).name == "masked_ar"


def test_rate_metrics_tokens_and_mfu():
    m = ARMethod(ARConfig(model="debug-tiny"), spec()).to(torch.device("cpu"))
    assert m.rate_metrics(10.0) == {"tokens_per_s": 10.0 * L}  # no MFU on CPU
    m._peak = 1e12
    out = m.rate_metrics(10.0)
    assert out["mfu"] == pytest.approx(10.0 * L * m.flops_per_token / 1e12)


def test_flops_per_token_and_peaks():
    from system.models.flops import gpt_flops_per_token, gpt_matmul_params, peak_flops
    from system.models.gpt import GPT
    from system.models.registry import gpt_config

    for name in ("llamagen-b", "alitok-b"):
        cfg = gpt_config(name)
        with torch.device("meta"):
            model = GPT(cfg)
        skip = ("embedding", "norm", "tok_embeddings", "cls_embedding")
        n = sum(p.numel() for k, p in model.named_parameters() if not any(s in k for s in skip))
        assert gpt_matmul_params(cfg) == n
        assert gpt_flops_per_token(cfg) == 6 * n + 12 * cfg.n_layer * cfg.dim * cfg.seq_len
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_flops("Some CPU") is None


def test_token_data_reads_the_index(tmp_path):
    from system.config import ARExperiment, TokenDataConfig
    from system.data.tokens import write_token_set

    codes = np.random.default_rng(0).integers(0, V, (12, L))
    write_token_set(str(tmp_path / "tok"), codes, np.arange(12) % 3, V, num_shards=2)
    exp = ARExperiment(run_name="x", data=TokenDataConfig(url=str(tmp_path / "tok")))
    d = TokenShards().resolve(exp)
    assert d.num_classes == 3 and d.tokens.seq_len == L and d.tokens.vocab_size == V
    assert registry.get("ar").source.resolve(exp) == d  # the method declares its data through the registry
    exp.data.url = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="data.url"):
        TokenShards().resolve(exp)


def save_tiny_tokenizer(folder) -> str:
    from system.models.artifacts import Artifact, save_export
    from system.models.tokenizer1d import Tokenizer1D, tokenizer_config

    torch.manual_seed(0)
    tok = Tokenizer1D(tokenizer_config("debug-tiny"))
    save_export(str(folder), {"tokenizer": Artifact.of("tokenizer1d", tok)})
    return str(folder)


@pytest.mark.parametrize("method_cls, cfg_cls, over", [(ARMethod, ARConfig, {}), (MaskedARMethod, MaskedARConfig, TINY)])
def test_export_round_trip_samples_and_decodes(tmp_path, method_cls, cfg_cls, over):
    from system.models.artifacts import save_export
    from system.sampling.generators import load_generator, load_pair

    tok_url = save_tiny_tokenizer(tmp_path / "tok")
    model_name = "debug-tiny" if method_cls is ARMethod else "semtok-ar-l"
    cfg = cfg_cls(model=model_name, overrides=over, tokenizer_export=tok_url, sample_steps=4) if method_cls is MaskedARMethod \
        else cfg_cls(model=model_name, tokenizer_export=tok_url)
    method_cls.check(cfg, spec())
    torch.manual_seed(0)
    m, model = build(method_cls, cfg)
    rows = m.sample_images({"ar": model}, m.sample_batch(batch(), 2), seed=0)
    assert set(rows) == {"data (decoded codes)", "ar_sample"} and rows["ar_sample"].shape == (2, 3, 32, 32)
    arts = m.artifacts({"ar": model})
    assert set(arts) == {"tokenizer", "ar"} and arts["ar"].kind == "gpt"
    save_export(str(tmp_path / "export"), arts)
    gen = load_generator(str(tmp_path / "export"))
    b = batch()
    model.eval()
    with torch.no_grad():
        assert torch.equal(gen(b["codes"], b["label"]), model(b["codes"], b["label"]))
    tok, gen = load_pair(str(tmp_path / "export"))
    codes = gen.sample(torch.arange(3), cfg_scale=2.0, seed=0)
    assert codes.shape == (3, L) and int(codes.max()) < V
    assert tok.decode(codes).shape == (3, 3, 32, 32)
    assert torch.equal(codes, gen.sample(torch.arange(3), cfg_scale=2.0, seed=0))  # seeded


def test_no_tokenizer_no_grid_and_ar_only_export():
    m, model = build(ARMethod, ARConfig(model="debug-tiny"))
    assert m.sample_batch(batch(), 2) is None
    assert set(m.artifacts({"ar": model})) == {"ar"}



def test_prefix_count_must_be_the_tokenizers(tmp_path):
    """AliTok: one prefix count from the tokenizer to the AR model. Sequences that leave no square
    grid name the count that would (17 for 273 codes); a tokenizer export with another prefix count
    than the AR model's is refused, naming the key."""
    from system.models.artifacts import Artifact, save_export
    from system.models.tokenizer1d import Tokenizer1D, tokenizer_config

    with pytest.raises(ConfigError, match=r"method\.overrides\.prefix_tokens=17"):
        ARMethod.check(ARConfig(model="alitok-xl"), spec(seq_len=273, vocab=4096))  # the preset's 16 vs the code's 17
    ARMethod.check(ARConfig(model="alitok-xl", overrides={"prefix_tokens": 17}), spec(seq_len=273, vocab=4096))
    tc = tokenizer_config("debug-tiny-alitok")  # 1 + 4 prefix codes, a 4 x 4 grid, 64 codes
    save_export(str(tmp_path), {"tokenizer": Artifact.of("tokenizer1d", Tokenizer1D(tc))})
    ok = ARConfig(model="debug-tiny", overrides={"prefix_tokens": 5, "rope": "mixed"}, tokenizer_export=str(tmp_path))
    ARMethod.check(ok, spec(seq_len=21, vocab=64))
    bad = ARConfig(model="debug-tiny", overrides={"prefix_tokens": 1, "rope": "1d"}, tokenizer_export=str(tmp_path))
    with pytest.raises(ConfigError, match=r"method\.tokenizer_export.*prefix_tokens.*1 prefix tokens.*5"):
        ARMethod.check(bad, spec(seq_len=21, vocab=64))


def test_embeddings_out_of_weight_decay_as_alitoks_code():
    """method.decay_embeddings=false (configs/experiments/ar_alitok.yaml, as AliTok's create_optimizer)
    names the token and class tables for the engine to keep out of weight decay; ar_alitok.yaml also
    trains without an EMA (use_ema False: samples and exports are the raw weights)."""
    from system.config import ARExperiment, load_config

    assert ARMethod(ARConfig(model="debug-tiny"), spec()).modules()["ar"].no_decay == ()
    m = ARMethod(ARConfig(model="debug-tiny", decay_embeddings=False), spec())
    assert m.modules()["ar"].no_decay == ("tok_embeddings.weight", "cls_embedding.weight")
    exp = load_config(ARExperiment, ["data.url=/tokens"], ["base.yaml", "experiments/ar_alitok.yaml"])
    assert exp.method.decay_embeddings is False and exp.method.ema_decay == 0.0
    assert (exp.optim.lr, exp.optim.betas, exp.optim.weight_decay, exp.optim.warmup_steps) == (4e-4, (0.9, 0.96), 0.03, 62500)
