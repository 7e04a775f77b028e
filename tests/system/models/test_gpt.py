"""GPT: shapes, causality, differentiable embedding, class dropout, heads, checkpointing."""
from __future__ import annotations

import pytest
import torch

from system.models.gpt import GPT, bits_to_index, index_to_bits
from system.models.registry import gpt_config


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = GPT(gpt_config("debug-tiny", **kw))
    torch.nn.init.normal_(m.output.weight, std=0.02)  # zero-init head would hide everything
    return m.eval()


def test_init_as_llamagen():
    m = GPT(gpt_config("debug-tiny"))
    assert torch.all(m.output.weight == 0)
    assert m.cls_embedding.weight.shape[0] == 11  # 10 classes + null
    assert abs(m.tok_embeddings.weight.std().item() - 0.02) < 0.005


def test_forward_shape_and_causality():
    m = _model()
    tok = torch.randint(0, 64, (2, 16))
    lab = torch.tensor([1, 2])
    logits = m(tok, lab)
    assert logits.shape == (2, 16, 64) and logits.dtype == torch.float32
    tok2 = tok.clone()
    tok2[:, 5] = (tok2[:, 5] + 1) % 64
    l2 = m(tok2, lab)
    torch.testing.assert_close(l2[:, :6], logits[:, :6])  # positions <= 5 never see token 5
    assert not torch.allclose(l2[:, 6:], logits[:, 6:])
    assert not torch.allclose(m(tok, torch.tensor([3, 4])), logits)  # class conditioning matters


def test_targets_return_loss_and_too_long_errors():
    m = _model()
    tok = torch.randint(0, 64, (2, 16))
    logits, loss = m(tok, torch.tensor([0, 1]), targets=tok)
    assert loss.ndim == 0 and loss.item() > 0
    with pytest.raises(ValueError, match="exceeds seq_len"):
        m(torch.randint(0, 64, (1, 17)), torch.tensor([0]))


def test_probs_codebook_embedding_gets_gradients():
    m = _model(code_dim=8)
    cb = torch.randn(64, 8, requires_grad=True)
    tok = torch.randint(0, 64, (2, 16))
    probs = torch.softmax(torch.randn(2, 16, 64), -1).requires_grad_(True)
    logits = m(probs=probs, codebook=cb, labels=torch.tensor([0, 1]))
    logits.square().mean().backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0
    assert cb.grad is not None and cb.grad.abs().sum() > 0
    onehot = torch.nn.functional.one_hot(tok, 64).float()
    a = m(probs=onehot, codebook=cb, labels=torch.tensor([0, 1]))
    b = m(tok, torch.tensor([0, 1]), codebook=cb)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="codebook must be"):
        m(probs=probs, codebook=torch.randn(64, 3), labels=torch.tensor([0, 1]))


def test_probs_through_own_table_and_no_unused_table():
    """h = Ind^T E through the model's own table; a codebook-input model builds no table (and
    still loads a state dict written when it did)."""
    m = _model()
    assert m.code_proj is None
    probs = torch.softmax(torch.randn(2, 16, 64), -1).requires_grad_(True)
    m(probs=probs, labels=torch.tensor([0, 1])).square().mean().backward()
    assert probs.grad.abs().sum() > 0 and m.tok_embeddings.weight.grad.abs().sum() > 0
    tok = torch.randint(0, 64, (2, 16))
    onehot = torch.nn.functional.one_hot(tok, 64).float()
    torch.testing.assert_close(m(probs=onehot, labels=torch.tensor([0, 1])), m(tok, torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="own table"):
        m(tok, torch.tensor([0, 1]), codebook=torch.randn(64, 8))
    c = _model(code_dim=8)
    assert c.tok_embeddings is None and "tok_embeddings.weight" not in c.state_dict()
    assert c.num_params() == m.num_params() - 64 * 64 + 8 * 64
    legacy = dict(c.state_dict(), **{"tok_embeddings.weight": torch.zeros(64, 64)})  # the old never-read table
    c.load_state_dict(legacy)
    with pytest.raises(ValueError, match="codebook must be"):
        c(tok, torch.tensor([0, 1]))


def test_class_dropout_in_training():
    m = _model(class_dropout=1.0)
    m.train()
    tok = torch.randint(0, 64, (2, 16))
    a = m(tok, torch.tensor([1, 2]))
    b = m(tok, torch.tensor([3, 4]))
    torch.testing.assert_close(a, b)  # every label dropped to the null class


def test_masked_bitwise_adaln_model():
    torch.manual_seed(0)
    m = GPT(gpt_config("debug-tiny", vocab_size=2**6, head="bitwise", n_bits=6, bidirectional=True,
                       adaln=True, qk_norm=True, rope="1d")).eval()
    torch.nn.init.normal_(m.output.weight, std=0.02)
    torch.nn.init.normal_(m.adaln_mod[1].weight, std=0.02)
    tok = torch.randint(0, 64, (2, 16))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 8:] = True
    logits = m(tok, torch.tensor([0, 1]), token_mask=mask)
    assert logits.shape == (2, 16, 6, 2)
    tok2 = tok.clone()
    tok2[:, 12] = (tok2[:, 12] + 1) % 64  # masked position: its id is never seen
    torch.testing.assert_close(m(tok2, torch.tensor([0, 1]), token_mask=mask), logits)
    tok2[:, 3] = (tok2[:, 3] + 1) % 64  # visible later token changes earlier logits (bidirectional)
    assert not torch.allclose(m(tok2, torch.tensor([0, 1]), token_mask=mask)[:, 0], logits[:, 0])
    _, loss = m(tok, torch.tensor([0, 1]), token_mask=mask, targets=tok)
    assert loss.item() > 0


def test_bits_roundtrip():
    idx = torch.tensor([0, 1, 5, 2**18 - 1, 123456])
    assert torch.equal(bits_to_index(index_to_bits(idx, 18)), idx)


def test_grad_checkpointing_same_grads():
    tok = torch.randint(0, 64, (2, 16))
    grads = []
    for ckpt in (False, True):
        m = _model(grad_checkpointing=ckpt)
        m.train()
        m(tok, torch.tensor([0, 1])).sum().backward()
        grads.append(m.layers[0].attention.wqkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_alitok_prefix_layout_runs():
    m = _model(rope="mixed", prefix_tokens=4, qk_norm=True, qkv_bias=True)
    assert m.rope.shape == (1 + 4 + 16, 8, 2)
    assert m(torch.randint(0, 64, (1, 20)), torch.tensor([0])).shape == (1, 20, 64)


def test_alitok_presets_follow_the_released_code():
    cfg = gpt_config("alitok-l")
    assert (cfg.attn_dropout, cfg.qkv_bias, cfg.proj_bias, cfg.output_bias) == (0.1, True, True, True)
    m = _model(proj_bias=True, output_bias=True, attn_dropout=0.1)
    assert m.output.bias.shape == (64,) and m.layers[0].attention.wo.bias.shape == (64,)
    m.train()
    m(torch.randint(0, 64, (2, 16)), torch.tensor([0, 1])).sum().backward()
    assert m.output.bias.grad.abs().sum() > 0 and m.layers[1].attention.wo.bias.grad.abs().sum() > 0
    assert _model().output.bias is None  # LlamaGen's layout has none (its checkpoints load exactly)


def test_rope_table_stays_float32_under_cast():
    m = _model().to(torch.bfloat16)
    assert m.rope.dtype == torch.float32 and m.output.weight.dtype == torch.bfloat16
    torch.testing.assert_close(m.rope, _model().rope)
    assert m(torch.randint(0, 64, (1, 16)), torch.tensor([0])).dtype == torch.float32


def test_1d_rope_takes_any_sequence_length():
    from system.models.registry import gpt_config

    cfg = gpt_config("debug-tiny", rope="1d", block_size=12)
    model = GPT(cfg)
    logits = model(torch.randint(0, cfg.vocab_size, (2, 12)), torch.tensor([0, 1]))
    assert logits.shape == (2, 12, cfg.vocab_size)
    with pytest.raises(ValueError, match="not a square number"):
        gpt_config("debug-tiny", rope="2d", block_size=12)
