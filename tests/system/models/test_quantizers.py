import math

import pytest
import torch

from system.models.quantizers import (
    BSQuantizer,
    IBQuantizer,
    QuantizerConfig,
    VectorQuantizer,
    bits_to_codes,
    build_quantizer,
    codebook_perplexity,
    codebook_usage,
    codes_to_bits,
)


def _z(b=2, l=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, l, d, generator=g).requires_grad_(True)


@pytest.mark.parametrize("l2", [False, True])
def test_vq_shapes_nearest_code_and_gradients(l2):
    torch.manual_seed(0)
    q = VectorQuantizer(QuantizerConfig(type="vq", codebook_size=16, dim=8, l2_norm=l2))
    z = _z()
    out = q(z)
    assert out.codes.shape == (2, 5) and out.codes.dtype == torch.long
    assert out.quantized.shape == (2, 5, 8) and out.probs is None
    # forward value is the chosen code vector; the code is the nearest one
    zn = torch.nn.functional.normalize(z, dim=-1) if l2 else z
    cb = q.codebook
    torch.testing.assert_close(out.quantized, cb[out.codes], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.codes, torch.cdist(zn, cb.expand(2, -1, -1)).argmin(-1))
    assert set(out.losses) == {"commit", "codebook"}
    (out.quantized.square().sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert q.embedding.weight.grad.abs().sum() > 0


def test_vq_reinit_replaces_dead_codes_deterministically():
    cfg = QuantizerConfig(type="vq", codebook_size=8, dim=4, reinit_after_steps=2)
    q = VectorQuantizer(cfg)
    before = q.embedding.weight.detach().clone()
    codes = torch.tensor([[0, 1, 1, 0]])
    feats = torch.arange(40.0).view(10, 4)
    assert q.reinit_dead_codes(codes, feats) == 0  # one step unused < 2
    torch.manual_seed(123)
    n = q.reinit_dead_codes(codes, feats)
    assert n == 6  # codes 2..7 unused for 2 steps
    w = q.codebook.detach()
    assert torch.equal(w[:2], before[:2])  # used codes untouched
    assert all(any(torch.allclose(w[i], f, rtol=0, atol=1e-5) for f in feats) for i in range(2, 8))
    assert torch.equal(q.embedding.weight, before)  # the trained weight is untouched: the offset moves
    assert int(q.unused_steps.max()) == 0
    # same RNG state -> same replacement
    q2 = VectorQuantizer(cfg)
    q2.load_state_dict({"embedding.weight": before, "unused_steps": torch.zeros(8, dtype=torch.long),
                        "code_offset": torch.zeros(8, 4)})
    q2.reinit_dead_codes(codes, feats)
    torch.manual_seed(123)
    q2.reinit_dead_codes(codes, feats)
    assert torch.equal(q2.codebook, w)


def _official_cluster_step(weight, embed_prob, z, idx, decay):
    """The official rule (alitok train_tokenizer/model/vae_stage1.py) on one process, written out;
    `idx`: the forward's codes (given: identical codes, which the rule creates, make argmin ties)."""
    k = weight.shape[0]
    d = z.pow(2).sum(1, keepdim=True) + weight.pow(2).sum(1) - 2 * z @ weight.t()
    embed_prob = embed_prob * decay + torch.nn.functional.one_hot(idx, k).float().mean(0) * (1 - decay)
    feat = z[d.argmin(0)]
    a = torch.exp(-(embed_prob * k * 10) / (1 - decay) - 1e-3)[:, None]
    return weight * (1 - a) + feat * a, embed_prob


def test_vq_cluster_update_is_the_official_rule_and_keeps_the_weight():
    torch.manual_seed(0)
    q = VectorQuantizer(QuantizerConfig(type="vq", codebook_size=16, dim=4, cluster_decay=0.99))
    w0 = q.embedding.weight.detach().clone()
    ref_w, ref_p = w0.clone(), torch.zeros(16)
    for step in range(3):
        z = torch.randn(2, 10, 4) + step
        codes = q(z).codes
        dist, feat = q.nearest_features(z)
        counts = torch.bincount(codes.flatten(), minlength=16).float()
        a = q.cluster_update(counts, dist[None], feat[None])
        ref_w, ref_p = _official_cluster_step(ref_w, ref_p, z.reshape(-1, 4), codes.flatten(), 0.99)
        torch.testing.assert_close(q.codebook, ref_w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q.usage_ema, ref_p)
    assert a.shape == (16,) and bool((a >= 0).all() and (a < 1).all()) and a.max() > 0.99  # an unused code moves
    assert torch.equal(q.embedding.weight, w0)  # the offset moved, not the trained weight
    cfg, sd = q.inference_state()
    plain = VectorQuantizer(cfg)
    plain.load_state_dict(sd)  # strict: no training buffers left
    assert not cfg.reinit and plain.code_offset is None
    torch.testing.assert_close(plain.codebook, q.codebook)
    with pytest.raises(ValueError, match="choose one"):
        QuantizerConfig(type="vq", reinit_after_steps=3, cluster_decay=0.99)


def test_vq_cluster_update_picks_the_nearest_feature_over_all_ranks():
    """Two ranks' halves of a batch give exactly the one-process update of the whole batch."""
    torch.manual_seed(0)
    cfg = QuantizerConfig(type="vq", codebook_size=8, dim=4, cluster_decay=0.99)
    whole, split = VectorQuantizer(cfg), VectorQuantizer(cfg)
    split.load_state_dict(whole.state_dict())
    z = torch.randn(4, 6, 4)
    codes = whole(z).codes
    counts = torch.bincount(codes.flatten(), minlength=8).float()
    d, f = whole.nearest_features(z)
    whole.cluster_update(counts, d[None], f[None])
    parts = [split.nearest_features(z[:2]), split.nearest_features(z[2:])]
    split.cluster_update(counts, torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    assert torch.equal(split.codebook, whole.codebook)


def test_vq_reinit_requires_it_enabled():
    q = VectorQuantizer(QuantizerConfig(type="vq", codebook_size=8, dim=4))
    with pytest.raises(RuntimeError, match="reinit_after_steps"):
        q.reinit_dead_codes(torch.zeros(1, 2, dtype=torch.long), torch.zeros(2, 4))


def test_ibq_probs_onehot_and_gradients_to_encoder_and_codebook():
    torch.manual_seed(0)
    q = IBQuantizer(QuantizerConfig(type="ibq", codebook_size=16, dim=8, entropy_weight=0.1))
    z = _z()
    out = q(z)
    assert out.probs.shape == (2, 5, 16) and out.onehot.shape == (2, 5, 16)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(2, 5))
    assert torch.equal(out.codes, out.probs.argmax(-1))
    torch.testing.assert_close(out.onehot, torch.nn.functional.one_hot(out.codes, 16).float())
    torch.testing.assert_close(out.quantized, q.codebook[out.codes])
    assert set(out.losses) == {"double", "commit", "codebook", "entropy"}
    # only through the straight-through path: grads reach z and *every* code row
    out.quantized.sum().backward()
    assert z.grad.abs().sum() > 0
    assert (q.embedding.weight.grad.abs().sum(-1) > 0).all()


def test_ibq_entropy_regulariser_sign():
    # confident, diverse assignments -> lower loss than confident, collapsed ones
    q = IBQuantizer(QuantizerConfig(type="ibq", codebook_size=4, dim=4, entropy_weight=1.0, entropy_temperature=1.0))
    with torch.no_grad():
        q.embedding.weight.copy_(torch.eye(4))
    diverse = 10 * torch.eye(4).unsqueeze(0)
    collapsed = 10 * torch.eye(4)[[0, 0, 0, 0]].unsqueeze(0)
    assert q(diverse).losses["entropy"] < q(collapsed).losses["entropy"]


def test_bsq_quantize_codes_and_gradients():
    d = 6
    q = BSQuantizer(QuantizerConfig(type="bsq", dim=d, entropy_weight=0.1))
    z = _z(d=d)
    out = q(z)
    assert out.codes.shape == (2, 5) and out.codes.dtype == torch.long
    expected = torch.sign(z.detach()) / math.sqrt(d)
    torch.testing.assert_close(out.quantized, expected)
    torch.testing.assert_close(q.embed_codes(out.codes), expected)
    assert q.codebook.shape == (2**d, d)
    assert set(out.losses) == {"commit", "entropy"}
    (out.quantized * torch.randn_like(out.quantized)).sum().backward()
    assert z.grad.abs().sum() > 0


def test_bsq_bits_roundtrip_up_to_32_bits():
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2, (3, 7, 32), generator=g)
    codes = bits_to_codes(bits)
    assert codes.dtype == torch.long and int(codes.max()) < 2**32
    assert torch.equal(codes_to_bits(codes, 32), bits)
    assert int(bits_to_codes(torch.ones(32, dtype=torch.long))) == 2**32 - 1
    assert torch.equal(codes_to_bits(torch.tensor([5]), 3), torch.tensor([[1, 0, 1]]))


def test_bsq_entropy_prefers_diverse_confident_bits():
    q = BSQuantizer(QuantizerConfig(type="bsq", dim=2, entropy_weight=1.0, bsq_inv_temperature=10.0))
    diverse = torch.tensor([[[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]]])
    collapsed = torch.tensor([[[1.0, 1.0]] * 4])
    assert q(diverse).losses["entropy"] < q(collapsed).losses["entropy"]


def test_usage_and_perplexity_on_hand_made_codes():
    codes = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert codebook_usage(codes, 8) == 0.5
    assert codebook_perplexity(codes, 8) == pytest.approx(4.0)
    assert codebook_perplexity(torch.tensor([5, 5, 5]), 8) == pytest.approx(1.0)
    assert codebook_usage(torch.tensor([[2**32 - 1, 0]]), 2**32) == pytest.approx(2 / 2**32)
    with pytest.raises(ValueError, match="codes must lie"):
        codebook_usage(torch.tensor([8]), 8)


def test_config_validation_and_builder():
    with pytest.raises(ValueError, match="quantizer type"):
        QuantizerConfig(type="fsq")
    with pytest.raises(ValueError, match="int64"):
        QuantizerConfig(type="bsq", dim=63)
    assert isinstance(build_quantizer(QuantizerConfig(type="ibq", codebook_size=4, dim=2)), IBQuantizer)
    with pytest.raises(ValueError, match=r"\(B, L, 2\)"):
        build_quantizer(QuantizerConfig(type="vq", codebook_size=4, dim=2))(torch.zeros(3, 4))


@pytest.mark.parametrize("kind", ["vq", "ibq"])
def test_code_assignment_is_fp32_under_autocast(kind):
    torch.manual_seed(0)
    q = build_quantizer(QuantizerConfig(type=kind, codebook_size=512, dim=8))
    z = torch.randn(4, 64, 8)
    ref = q(z).codes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    assert torch.equal(out.codes, ref)
