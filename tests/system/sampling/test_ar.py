"""KV-cache sampling equals uncached recomputation; schedules and filters behave."""
from __future__ import annotations

import math

import pytest
import torch

from system.models.gpt import GPT
from system.models.registry import gpt_config
from system.models import attention as A
from system.models.attention import flash_available, flash_device_reason, masked_cache_attention
from system.sampling.ar import cached_logits, cfg_scale_at, filter_logits, generate, sample_logits


def _model(**kw):
    torch.manual_seed(0)
    m = GPT(gpt_config("debug-tiny", **kw))
    torch.nn.init.normal_(m.output.weight, std=0.5)  # sharp, non-trivial logits
    return m.eval()


@pytest.mark.parametrize("cfg_scale,schedule", [(1.0, "constant"), (4.0, "constant"), (3.0, "power-cosine")])
def test_cached_equals_uncached_greedy(cfg_scale, schedule):
    m = _model()
    labels = torch.tensor([0, 3, 7])
    kw = dict(cfg_scale=cfg_scale, schedule=schedule, temperature=0.0, cfg_power=0.7)
    fast = generate(m, labels, **kw)
    slow = generate(m, labels, use_cache=False, **kw)
    assert fast.shape == (3, 16)
    assert torch.equal(fast, slow)
    assert len(set(fast.flatten().tolist())) > 3  # not a degenerate constant sequence


def test_cached_equals_uncached_sampled_mixed_rope_prefix():
    # AliTok's AR layout and options: prefix tokens, mixed RoPE, QK-norm, biases, attention dropout (off in eval)
    m = _model(rope="mixed", prefix_tokens=4, qk_norm=True, qkv_bias=True, proj_bias=True, output_bias=True,
               attn_dropout=0.1)
    torch.nn.init.normal_(m.output.bias, std=0.5)
    torch.nn.init.normal_(m.layers[0].attention.wo.bias, std=0.5)
    labels = torch.tensor([1, 2])
    kw = dict(cfg_scale=2.0, schedule="linear", temperature=1.0, top_k=20, top_p=0.9, seed=5)
    fast = generate(m, labels, **kw)
    assert fast.shape == (2, 20)
    assert torch.equal(fast, generate(m, labels, use_cache=False, **kw))
    assert torch.equal(fast, generate(m, labels, **kw))  # deterministic under a seed
    assert not torch.equal(fast, generate(m, labels, **{**kw, "seed": 6}))


def test_cached_with_codebook_input():
    m = _model(code_dim=8)
    cb = torch.randn(64, 8)
    labels = torch.tensor([4])
    fast = generate(m, labels, temperature=0.0, codebook=cb)
    assert torch.equal(fast, generate(m, labels, temperature=0.0, codebook=cb, use_cache=False))


def test_cfg_schedules():
    assert cfg_scale_at(5, 10, 4.0, "constant") == 4.0
    assert cfg_scale_at(0, 10, 4.0, "linear") == 1.0
    assert math.isclose(cfg_scale_at(5, 10, 4.0, "linear"), 2.5)
    assert cfg_scale_at(0, 256, 6.0, "power-cosine", 0.7) == 1.0
    mid = cfg_scale_at(128, 256, 6.0, "power-cosine", 0.7)
    assert math.isclose(mid, 1 + 5 * (1 - math.cos(math.pi * 0.5**0.7)) / 2)
    with pytest.raises(ValueError, match="unknown CFG schedule"):
        cfg_scale_at(0, 1, 2.0, "cosine")


def test_top_k_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    g = torch.Generator().manual_seed(0)
    draws = sample_logits(logits.expand(2000, 4), top_p=0.7, generator=g)
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.625) < 0.05  # 0.5 / 0.8 after renormalising


def test_decode_one_compiles_without_graph_breaks():
    m = _model(n_layer=1, rope="mixed", prefix_tokens=4, qk_norm=True)
    labels = torch.tensor([0, 3])
    step = torch.compile(m.decode_one, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    fast = generate(m, labels, cfg_scale=3.0, temperature=0.0, decode_fn=step)
    assert torch.equal(fast, generate(m, labels, cfg_scale=3.0, temperature=0.0))


@pytest.mark.gpu
def test_compiled_decode_matches_eager_on_gpu():
    m = _model().cuda()
    labels = torch.tensor([0, 3], device="cuda")
    eager = generate(m, labels, cfg_scale=3.0, temperature=0.0)
    fast = generate(m, labels, cfg_scale=3.0, temperature=0.0, decode_fn=torch.compile(m.decode_one))
    assert torch.equal(eager, fast)


# --------------------------------------------- the fast KV-cache paths give today's (masked) numbers
ALITOK_LIKE = dict(rope="mixed", prefix_tokens=4, qk_norm=True, qkv_bias=True, proj_bias=True)


def _cfg_batch(m, b=3, seed=0):
    """Labels and tokens of a CFG batch: [cond; null class], the same tokens twice."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, m.cfg.num_classes, (b,), generator=g)
    tokens = torch.randint(0, m.cfg.vocab_size, (b, m.cfg.seq_len), generator=g)
    return torch.cat([labels, torch.full_like(labels, m.cfg.num_classes)]), torch.cat([tokens, tokens])


@pytest.mark.parametrize("kw", [{}, ALITOK_LIKE], ids=["llamagen", "alitok"])
def test_filled_cache_path_equals_the_masked_path(kw):
    m = _model(**kw)
    labels, tokens = _cfg_batch(m)
    fast = cached_logits(m, labels, tokens)  # host positions: the cache cut to its filled part, no mask
    with masked_cache_attention():
        ref = cached_logits(m, labels, tokens)  # the whole static cache under a mask (the path before)
    assert fast.shape == (6, m.cfg.seq_len, m.cfg.vocab_size)
    assert (fast - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max())
    teacher = m(tokens, labels)  # and both are the uncached forward's numbers
    assert (fast - teacher).abs().max() < 1e-4 * max(1.0, teacher.abs().max())


def test_flash_kv_cache_path_in_the_model_follows_its_contract(fake_flash_kvcache):
    """flash_attn_with_kvcache replaced by its documented contract in torch: the model hands it the
    cache in place (transposed views), the filled lengths, and gets the masked path's numbers."""
    calls = fake_flash_kvcache
    m = _model(**ALITOK_LIKE)
    labels, tokens = _cfg_batch(m, b=2)
    n = m.cfg.seq_len
    for decode_fn in (None, m.decode_one):  # host positions, then device positions (a decode_fn's)
        calls.clear()
        fast = cached_logits(m, labels, tokens, decode_fn=decode_fn)
        assert calls == [[i] * 4 for i in range(1, n + 1) for _ in range(m.cfg.n_layer)]  # prefill: 1 key
        with masked_cache_attention():
            ref = cached_logits(m, labels, tokens, decode_fn=decode_fn)
        assert (fast - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max())


@pytest.mark.parametrize("kw,cache_dtype", [({}, torch.bfloat16), (ALITOK_LIKE, torch.float32)])
def test_cache_keeps_keys_in_the_dtype_they_are_computed_in(kw, cache_dtype):
    """Under bf16 autocast with fp32 weights the keys are bf16 (fp32 after QK-norm's fp32 gain): the
    cache holds them as they are, with the numbers a float32 cache gave."""
    m = _model(**kw)
    labels, tokens = _cfg_batch(m, b=2)

    def run(dtype):
        m.setup_cache(labels.shape[0], 1 + tokens.shape[1], dtype)
        out = [m.prefill(labels)]
        out += [m.decode_one(tokens[:, i : i + 1], torch.tensor([1 + i]), labels) for i in range(tokens.shape[1] - 1)]
        dtypes = {c.k.dtype for c in m._caches}
        m.clear_cache()
        return torch.stack(out, 1), dtypes

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        adopted, dtypes = run(None)
        fp32, _ = run(torch.float32)
    assert dtypes == {cache_dtype}
    assert torch.equal(adopted, fp32)


@pytest.mark.gpu
def test_flash_decode_matches_the_masked_path_on_gpu():
    """flash_attn_with_kvcache vs the masked path: logits over a 256-token decode (bf16, CFG batch),
    and tokens/s of both (printed; run with -s)."""
    import contextlib
    import time

    if not flash_available() or flash_device_reason() is not None:
        pytest.skip(f"flash-attn unusable here: {flash_device_reason() if flash_available() else 'not installed'}")
    torch.manual_seed(0)
    m = GPT(gpt_config("debug-tiny", block_size=256, dim=512, n_head=8, n_layer=8, vocab_size=4096)).cuda()
    torch.nn.init.normal_(m.output.weight, std=0.02)
    m = m.to(torch.bfloat16).eval()
    labels, tokens = _cfg_batch(m, b=16)
    labels, tokens = labels.cuda(), tokens.cuda()
    calls = []
    real = A._flash_attn_with_kvcache
    A._flash_attn_with_kvcache = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        fast = cached_logits(m, labels, tokens)
    finally:
        A._flash_attn_with_kvcache = real
    assert len(calls) == 256 * m.cfg.n_layer  # the flash path ran every step
    with masked_cache_attention():
        ref = cached_logits(m, labels, tokens)
    diff = float((fast - ref).abs().max())
    speed = {}
    for name, ctx in (("flash", contextlib.nullcontext), ("masked", masked_cache_attention)):
        with ctx():
            generate(m, labels[:16], cfg_scale=4.0, num_tokens=16)  # warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            generate(m, labels[:16], cfg_scale=4.0)
            torch.cuda.synchronize()
            speed[name] = 16 * 256 / (time.perf_counter() - t)
    print(f"\nflash vs masked KV-cache decode: max |dlogits| {diff:.3g} (logits up to {float(ref.abs().max()):.3g}); "
          f"tokens/s flash {speed['flash']:.0f}, masked {speed['masked']:.0f}")
    assert diff < 0.05 * float(ref.abs().max())
