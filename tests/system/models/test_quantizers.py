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
    w = q.embedding.weight.detach()
    assert torch.equal(w[:2], before[:2])  # used codes untouched
    assert all(any(torch.equal(w[i], f) for f in feats) for i in range(2, 8))
    assert int(q.unused_steps.max()) == 0
    # same RNG state -> same replacement
    q2 = VectorQuantizer(cfg)
    q2.load_state_dict({"embedding.weight": before, "unused_steps": torch.zeros(8, dtype=torch.long)})
    q2.reinit_dead_codes(codes, feats)
    torch.manual_seed(123)
    q2.reinit_dead_codes(codes, feats)
    assert torch.equal(q2.embedding.weight, w)


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
