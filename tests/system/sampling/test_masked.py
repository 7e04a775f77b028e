"""Masked sampler: fills every position, deterministic under a seed, bitwise per-bit top-p."""
from __future__ import annotations

import pytest
import torch

from system.models.gpt import GPT
from system.models.registry import gpt_config
from system.sampling.masked import generate_masked, mask_schedule


def _model(**kw):
    torch.manual_seed(0)
    m = GPT(gpt_config("debug-tiny", bidirectional=True, rope="1d", **kw))
    torch.nn.init.normal_(m.output.weight, std=0.5)
    return m.eval()


def test_mask_schedule_cosine_and_complete():
    s = mask_schedule(256, 64)
    assert len(s) == 64 and s[-1] == 0
    assert all(a > b for a, b in zip([256] + s, s))  # reveals at least one per step
    assert s[:3] == [255, 254, 253] and s[31] == 181  # cosine: slow start, floor(256 cos(pi/4))
    assert mask_schedule(16, 16) == list(range(15, -1, -1))
    with pytest.raises(ValueError, match="steps must be"):
        mask_schedule(16, 17)


def test_softmax_head_fills_all_and_is_seeded():
    m = _model()
    labels = torch.tensor([1, 2, 3])
    a = generate_masked(m, labels, steps=4, cfg_scale=3.0, top_p=0.9, seed=0)
    assert a.shape == (3, 16) and a.dtype == torch.long
    assert ((a >= 0) & (a < 64)).all()
    assert torch.equal(a, generate_masked(m, labels, steps=4, cfg_scale=3.0, top_p=0.9, seed=0))
    assert not torch.equal(a, generate_masked(m, labels, steps=4, cfg_scale=3.0, top_p=0.9, seed=1))


def test_bitwise_head_per_bit_top_p():
    m = _model(vocab_size=2**10, head="bitwise", n_bits=10, adaln=True, qk_norm=True)
    labels = torch.tensor([0, 5])
    a = generate_masked(m, labels, steps=8, cfg_scale=2.0, top_p=0.75, seed=3)
    assert a.shape == (2, 16) and ((a >= 0) & (a < 2**10)).all()
    assert torch.equal(a, generate_masked(m, labels, steps=8, cfg_scale=2.0, top_p=0.75, seed=3))
    # top_p -> 0 keeps only the likelier class of each bit: same as greedy, whatever the seed
    g1 = generate_masked(m, labels, steps=8, top_p=1e-6, seed=1)
    g2 = generate_masked(m, labels, steps=8, temperature=0.0, seed=1)
    assert torch.equal(g1, g2)


def test_rejects_causal_model():
    with pytest.raises(ValueError, match="bidirectional"):
        generate_masked(GPT(gpt_config("debug-tiny")), torch.tensor([0]), steps=4)
