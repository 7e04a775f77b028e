"""AliTok's released checkpoint formats (github.com/ali-vilab/alitok) read into our models, on random
weights written in the official layout (key names and shapes as modeling/alitok.py, modeling/ar.py
and train_tokenizer/model/vae_stage1.py name them, at tiny sizes): every tensor used, none left over,
the official conventions kept (images in [0, 1], the summed query / position tables, the one shared
code + class table). That our logits and pixels equal the official code's was checked once outside
the project (docs/recipes.md, "Released checkpoints")."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alitok_layout import official_ar, official_tokenizer  # tests/alitok_layout.py
from system.models import artifacts as A
from system.models.adapters_alitok import (
    alitok_gpt_config, convert_alitok_ar, load_alitok_gpt, load_alitok_tokenizer, read_checkpoint)

HEADS = dict(enc_heads=12, dec_heads=16)  # the official head counts (not in the weights); width 48 fits both
AR_OVERRIDES = dict(n_head=4, prefix_tokens=5, block_size=16)  # the tiny grid: 4 x 4 after 1 + 4 prefix
AR = dict(preset="alitok-b", **AR_OVERRIDES)


def test_tokenizer_every_tensor_used_none_left_over():
    sd = official_tokenizer()
    tok = load_alitok_tokenizer(sd, **HEADS)  # strict: every one of ours loaded
    c = tok.cfg
    assert (c.image_size, c.patch_size, c.num_prefix_tokens, c.num_buffer_tokens, c.latent_dim) == (32, 8, 5, 4, 8)
    assert (c.decoder_layout, c.decoder_causal, c.decoder_reads_prefix, c.quantizer.codebook_size) == ("latents", False, True, 64)
    with pytest.raises(ValueError, match=r"not used: \['decoder.extra'\]"):
        load_alitok_tokenizer({**sd, "decoder.extra": torch.zeros(1)}, **HEADS)
    with pytest.raises(ValueError, match="missing tensor 'decoder.conv_out.bias'"):
        load_alitok_tokenizer({k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}, **HEADS)
    s1 = load_alitok_tokenizer({"model_state": official_tokenizer(stage1=True), "start_step": 3}, **HEADS)
    assert s1.cfg.decoder_causal and s1.decoder.prefix_head is not None and s1.decoder.buffer_tokens.shape[0] == 1


def test_tokenizer_keeps_the_official_conventions():
    """Images: the official encoder reads [0, 1] (folded into our patch embedding) and its decoder
    returns sigmoid pixels (ours 2 s - 1); the query / position tables only act through their sums."""
    sd = official_tokenizer()
    tok = load_alitok_tokenizer(sd, **HEADS)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    want = F.conv2d((x + 1) / 2, sd["encoder.patch_embed.weight"], sd["encoder.patch_embed.bias"], stride=8)
    torch.testing.assert_close(tok.encoder.patch_embed(x), want, rtol=1e-5, atol=1e-5)
    codes = tok.encode(x)[0].codes
    img = tok.decode_codes(codes)
    assert img.shape == (2, 3, 32, 32) and img.abs().max() < 1
    moved = dict(sd)
    d = torch.randn_like(sd["latent_tokens"])
    moved["latent_tokens"], moved["encoder.latent_token_positional_embedding"] = sd["latent_tokens"] + d, \
        sd["encoder.latent_token_positional_embedding"] - d
    t = sd["decoder.class_embedding"].shape[0]
    e = torch.randn_like(sd["decoder.class_embedding"])
    moved["decoder.class_embedding"] = sd["decoder.class_embedding"] + e
    pos = sd["decoder.latent_token_positional_embedding"].clone()
    pos[:t] -= e
    moved["decoder.latent_token_positional_embedding"] = pos
    other = load_alitok_tokenizer(moved, **HEADS)
    assert torch.equal(other.encode(x)[0].codes, codes)
    torch.testing.assert_close(other.decode_codes(codes), img, rtol=1e-5, atol=1e-5)


def test_ar_every_tensor_used_and_the_shared_table_split():
    """Codes embed through rows 0..V-1, class c through row V+1+c, the null class through the last
    row; row V is never read (as in the official code)."""
    sd = official_ar()
    g = load_alitok_gpt(sd, **AR)
    c = g.cfg
    assert (c.vocab_size, c.num_classes, c.prefix_tokens, c.block_size, c.n_layer, c.dim) == (64, 10, 5, 16, 2, 64)
    assert c.qk_norm and c.qkv_bias and c.proj_bias and c.output_bias and c.rope == "mixed"
    with pytest.raises(ValueError, match=r"not used: \['blocks.0.attn.extra'\]"):
        load_alitok_gpt({**sd, "blocks.0.attn.extra": torch.zeros(1)}, **AR)
    with pytest.raises(ValueError, match="missing tensor 'output.bias'"):
        load_alitok_gpt({k: v for k, v in sd.items() if k != "output.bias"}, **AR)
    ids, labels = torch.randint(0, 64, (2, 21)), torch.tensor([3, 10])  # class 3 and the null class
    base = g(ids, labels)
    for row, changes in ((64, []), (64 + 1 + 3, [0]), (64 + 1 + 10, [1])):
        moved = dict(sd)
        moved["embeddings.weight"] = sd["embeddings.weight"].clone()
        moved["embeddings.weight"][row] += 1.0
        out = load_alitok_gpt(moved, **AR)(ids, labels)
        for b in range(2):
            assert torch.equal(out[b], base[b]) != (b in changes), (row, b)
    assert alitok_gpt_config(official_ar(dim=768, depth=24, heads=16, vocab=4096, classes=1000)).prefix_tokens == 17


def test_file_formats_and_export(tmp_path):
    """torch.save'd .pth / .bin (plain or a training checkpoint's model_state) and safetensors read;
    `released_alitok` writes an export of kind "alitok-released" that loads as our tokenizer1d + GPT."""
    from safetensors.torch import save_file

    from system.models.tokenizers import load_tokenizer
    from system.sampling.generators import load_alitok, load_pair, released_alitok

    tok_sd, ar_sd = official_tokenizer(), official_ar()
    torch.save(tok_sd, tmp_path / "AliTok.pth")
    torch.save({"model_state": tok_sd, "log_dir": "x"}, tmp_path / "last.pth")
    torch.save(ar_sd, tmp_path / "alitok_b.bin")
    save_file(ar_sd, str(tmp_path / "ar.safetensors"))
    for src in ("AliTok.pth", "last.pth"):
        assert read_checkpoint(tmp_path / src).keys() == tok_sd.keys()
    assert read_checkpoint(tmp_path / "ar.safetensors").keys() == ar_sd.keys()
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "none.pth")
    parts = released_alitok(str(tmp_path / "alitok_b.bin"), str(tmp_path / "AliTok.pth"), "alitok-b",
                            n_head=4, prefix_tokens=5, block_size=16)
    assert {n: a.kind for n, a in parts.items()} == {"tokenizer": "alitok-released", "ar": "alitok-released"}
    A.save_export(str(tmp_path / "export"), parts)
    assert A.read_model_json(str(tmp_path / "export"))["ar"]["config"] == {"preset": "alitok-b", "overrides": AR_OVERRIDES}
    tok, gen = load_pair(str(tmp_path / "export"))
    assert torch.equal(load_tokenizer(str(tmp_path / "export")).codebook, tok.codebook)
    A.check_fit(gen, tok, 32)
    assert (tok.prefix_tokens, tok.unread_prefix, gen.prefix_tokens, gen.seq_len) == (5, 0, 5, 21)
    assert tok.artifact().kind == "tokenizer1d" and gen.artifact().kind == "gpt"  # re-exported in our layout
    ids = torch.randint(0, 64, (2, 21))
    labels = torch.tensor([1, 2])
    torch.testing.assert_close(gen(ids, labels), load_alitok_gpt(ar_sd, **AR)(ids, labels))
    t2, g2 = load_alitok(ar_sd, {**tok_sd}, "alitok-b", n_head=4, prefix_tokens=5, block_size=16)
    assert g2.seq_len == 21 and t2.vocab_size == 64
    assert convert_alitok_ar(ar_sd, alitok_gpt_config(ar_sd, **AR)).keys() == dict(g2.ar.state_dict()).keys()
