"""The GPT generator adapter: `masked` tells a bidirectional GPT from a causal one, and
`predict_masked` is a masked generator's prediction without reaching into its AR model."""
from __future__ import annotations

import pytest
import torch

from system.models.gpt import GPT, bits_to_index
from system.models.registry import gpt_config
from system.sampling.generators import generator_kinds
from system.sampling.gpt_generator import GPTGenerator
from system.sampling.masked import generate_masked


def _gen(**kw) -> GPTGenerator:
    torch.manual_seed(0)
    ar = GPT(gpt_config("debug-tiny", **kw))
    torch.nn.init.normal_(ar.output.weight, std=0.5)
    return GPTGenerator(ar.eval())


def test_a_causal_gpt_is_not_masked():
    gen = _gen()
    assert gen.masked is False and generator_kinds() == ["alitok-released", "gpt"]
    codes, labels = torch.randint(0, 64, (2, 16)), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="needs a masked"):
        gen.predict_masked(codes, labels, torch.ones(2, 16, dtype=torch.bool))


@pytest.mark.parametrize("bitwise", [False, True])
def test_a_bidirectional_gpt_is_masked_and_predicts_hidden_positions(bitwise):
    kw = dict(vocab_size=2**10, head="bitwise", n_bits=10, adaln=True, qk_norm=True) if bitwise else {}
    gen = _gen(bidirectional=True, rope="1d", **kw)
    assert gen.masked is True
    codes, labels = torch.randint(0, gen.vocab_size, (2, 16)), torch.tensor([3, 5])
    mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    pred = gen.predict_masked(codes, labels, mask)
    logits = gen.ar(codes, labels, token_mask=mask)
    want = bits_to_index(logits.argmax(-1)) if bitwise else logits.argmax(-1)
    assert pred.shape == (2, 16) and pred.dtype == torch.long and torch.equal(pred, want)
    assert ((pred >= 0) & (pred < gen.vocab_size)).all()
    # sampling goes through the masked sampler (min(64, seq_len) steps)
    assert torch.equal(gen.sample(labels, seed=0), generate_masked(gen.ar, labels, steps=16, seed=0))
