"""LlamaGen c2i GPT checkpoints load through the adapter and reproduce LlamaGen's forward."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from system.models.adapters_llamagen_gpt import load_llamagen_gpt, to_llamagen_gpt, unwrap_checkpoint
from system.models.gpt import GPT
from system.models.registry import gpt_config

DIM, HEADS, DEPTH, VOCAB, GRID = 64, 4, 2, 64, 4


def _llamagen_state_dict(seed=0):
    """Random weights written directly in LlamaGen's key layout (not produced by our model)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05
    hidden = 192  # find_multiple(int(8*64/3)=170, 32)
    sd = {
        "tok_embeddings.weight": r(VOCAB, DIM),
        "cls_embedding.embedding_table.weight": r(11, DIM),
        "norm.weight": 1 + r(DIM),
        "output.weight": r(VOCAB, DIM),
        "freqs_cis": torch.zeros(1 + GRID * GRID, DIM // HEADS // 2, 2),
    }
    for i in range(DEPTH):
        p = f"layers.{i}."
        sd[p + "attention.wqkv.weight"] = r(3 * DIM, DIM)
        sd[p + "attention.wo.weight"] = r(DIM, DIM)
        sd[p + "feed_forward.w1.weight"] = r(hidden, DIM)
        sd[p + "feed_forward.w3.weight"] = r(hidden, DIM)
        sd[p + "feed_forward.w2.weight"] = r(DIM, hidden)
        sd[p + "attention_norm.weight"] = 1 + r(DIM)
        sd[p + "ffn_norm.weight"] = 1 + r(DIM)
    return sd


def _reference_forward(sd, idx, labels):
    """LlamaGen's c2i training forward written out from its published equations (B, L-1) -> (B, L, V)."""
    hd = DIM // HEADS
    half = hd // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    f = torch.outer(torch.arange(GRID).float(), freqs)
    grid = torch.cat([f[:, None, :].expand(-1, GRID, -1), f[None, :, :].expand(GRID, -1, -1)], -1)
    table = torch.cat([torch.zeros(1, hd // 2, 2), torch.stack([grid.cos(), grid.sin()], -1).flatten(0, 1)])

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def rot(x, t):  # x (B, L, H, hd)
        xs = x.reshape(*x.shape[:-1], -1, 2)
        t = t.view(1, xs.shape[1], 1, xs.shape[3], 2)
        return torch.stack([xs[..., 0] * t[..., 0] - xs[..., 1] * t[..., 1],
                            xs[..., 1] * t[..., 0] + xs[..., 0] * t[..., 1]], -1).flatten(3)

    h = torch.cat([sd["cls_embedding.embedding_table.weight"][labels][:, None], sd["tok_embeddings.weight"][idx]], 1)
    b, l, _ = h.shape
    t = table[:l]
    for i in range(DEPTH):
        p = f"layers.{i}."
        x = rms(h, sd[p + "attention_norm.weight"])
        q, k, v = (x @ sd[p + "attention.wqkv.weight"].T).split(DIM, -1)
        q, k, v = (z.view(b, l, HEADS, hd) for z in (q, k, v))
        q, k = rot(q, t), rot(k, t)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        h = h + a.transpose(1, 2).reshape(b, l, DIM) @ sd[p + "attention.wo.weight"].T
        x = rms(h, sd[p + "ffn_norm.weight"])
        ff = F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)
        h = h + ff @ sd[p + "feed_forward.w2.weight"].T
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T


def test_load_llamagen_checkpoint_matches_reference(tmp_path):
    sd = _llamagen_state_dict()
    path = tmp_path / "c2i_tiny.pt"
    torch.save({"model": sd, "steps": 10}, path)
    model = load_llamagen_gpt(path, name="debug-tiny", rope="2d").eval()
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([3, 10])  # 10 = null class
    ours = model(tokens, labels)
    ref = _reference_forward(sd, tokens[:, :-1], labels)
    assert ours.shape == ref.shape == (2, 16, VOCAB)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_roundtrip_export_and_wrappers():
    torch.manual_seed(0)
    m = GPT(gpt_config("debug-tiny"))
    torch.nn.init.normal_(m.output.weight)
    theirs = to_llamagen_gpt(m.state_dict())
    assert "cls_embedding.embedding_table.weight" in theirs
    wrapped = {"module": {"_orig_mod." + k: v for k, v in theirs.items()}}
    assert set(unwrap_checkpoint(wrapped)) == set(theirs)
    m2 = load_llamagen_gpt(wrapped, name="debug-tiny").eval()
    tok = torch.randint(0, 64, (1, 16))
    torch.testing.assert_close(m2(tok, torch.tensor([1])), m.eval()(tok, torch.tensor([1])))


def test_mismatched_checkpoint_errors():
    sd = _llamagen_state_dict()
    del sd["layers.1.attention.wo.weight"]
    with pytest.raises(ValueError, match="missing"):
        load_llamagen_gpt({"model": sd}, name="debug-tiny")
    with pytest.raises(ValueError, match="no llamagen preset"):
        load_llamagen_gpt({"model": _llamagen_state_dict()})
