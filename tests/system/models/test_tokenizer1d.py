import dataclasses

import pytest
import torch
import torch.nn.functional as F

from system.models.tokenizer1d import (
    TOKENIZER_PRESETS,
    Tokenizer1D,
    Tokenizer1DConfig,
    causal_decoder_mask,
    tokenizer_config,
)


def _images(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def test_shapes_and_hooks_debug_tiny():
    torch.manual_seed(0)
    cfg = tokenizer_config("debug-tiny")
    model = Tokenizer1D(cfg)
    out = model(_images(), enc_hidden_layer=0, dec_hidden_layer=-1)
    assert out.image.shape == (2, 3, 32, 32)
    assert out.quant.codes.shape == (2, 16) and out.quant.quantized.shape == (2, 16, 16)
    assert out.quant.probs.shape == (2, 16, 64)
    assert out.enc_hidden.shape == (2, cfg.num_patches, cfg.enc_width)
    assert out.dec_hidden.shape == (2, cfg.num_patches, cfg.dec_width)
    assert out.prefix_row is None
    assert model.codebook.shape == (64, 16)
    assert model(_images()).dec_hidden is None  # decoder hook off by default
    # encoder hook: layer 0 differs from the last layer
    _, h_last = model.encode(_images())
    assert not torch.allclose(h_last, out.enc_hidden)


def test_decode_codes_matches_decode_of_quantized():
    torch.manual_seed(0)
    model = Tokenizer1D(tokenizer_config("debug-tiny")).eval()
    q, _ = model.encode(_images())
    torch.testing.assert_close(model.decode_codes(q.codes), model.decode(q.quantized), rtol=1e-5, atol=1e-5)


def test_recon_gradients_reach_encoder_and_ibq_codebook():
    torch.manual_seed(0)
    model = Tokenizer1D(tokenizer_config("debug-tiny"))
    img = _images()
    F.mse_loss(model(img).image, img).backward()  # reconstruction loss only
    enc = model.encoder
    for p in (enc.patch_embed.weight, enc.latent_tokens, enc.to_latent.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.quantizer.embedding.weight.grad.abs().sum() > 0


def test_vq_tokenizer_gradients_with_quant_loss():
    torch.manual_seed(0)
    model = Tokenizer1D(tokenizer_config("debug-tiny-causal"))
    img = _images()
    out = model(img)
    (F.mse_loss(out.image, img) + F.mse_loss(out.prefix_row, img[:, :, :8]) + out.quant.loss).backward()
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0
    assert model.quantizer.embedding.weight.grad.abs().sum() > 0
    assert model.decoder.prefix_head.weight.grad.abs().sum() > 0


def test_causal_mask_definition():
    m = causal_decoder_mask(num_prefix=2, num_latent=4, num_patches=4)
    lat, pat = slice(0, 6), slice(6, 10)
    assert torch.equal(m[lat, lat], torch.tril(torch.ones(6, 6, dtype=torch.bool)))
    assert torch.equal(m[pat, pat], torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    # patch i sees both prefix latents and image latents 0..i
    expect = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m[pat, lat], expect)
    assert not m[lat, pat].any()  # latents never see patches
    # fewer latents than patches: patch i sees ceil((i+1) * L / N) latents
    m2 = causal_decoder_mask(0, 2, 4)
    assert m2[2:, :2].sum(-1).tolist() == [1, 1, 2, 2]


@pytest.mark.parametrize("num_latent,token_mix", [(16, False), (8, False), (16, True)])
def test_causal_decoder_patch_depends_only_on_prefix_and_earlier_latents(num_latent, token_mix):
    """d(patch i pixels) / d(latent j) == 0 exactly for every image latent j >= ceil((i+1) L / N),
    != 0 for the latent patch i is paired with; the prefix row depends only on prefix latents."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(tokenizer_config("debug-tiny-causal"), num_latent_tokens=num_latent, token_mix=token_mix)
    model = Tokenizer1D(cfg).eval()
    if token_mix:  # make the masked entries non-zero: the mask, not the init, must keep causality
        torch.nn.init.normal_(model.decoder.patch_mix)
    P, L, N, g, p = cfg.num_prefix_tokens, num_latent, cfg.num_patches, cfg.grid, cfg.patch_size
    zq = torch.randn(1, P + L, cfg.latent_dim, requires_grad=True)
    out = model.decode_full(zq, hidden_layer=0)
    for i in range(N):
        r, c = divmod(i, g)
        (grad,) = torch.autograd.grad(out.image[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p].sum(), zq, retain_graph=True)
        per_token = grad[0].abs().sum(-1)  # (P + L,)
        n_vis = -(-(i + 1) * L // N)
        assert per_token[: P + n_vis].gt(0).all(), f"patch {i} must see prefix + latents < {n_vis}"
        assert per_token[P + n_vis:].eq(0).all(), f"patch {i} must not see latents >= {n_vis}"
        (gh,) = torch.autograd.grad(out.hidden[0, i].sum(), zq, retain_graph=True)
        assert gh[0, P + n_vis:].eq(0).all()  # the decoder-layer hook obeys the same causality
    (gp,) = torch.autograd.grad(out.prefix_row.sum(), zq)
    assert gp[0, :P].abs().sum() > 0 and gp[0, P:].eq(0).all()
    assert out.prefix_row.shape == (1, 3, p, cfg.image_size)


def test_bidirectional_stage_drops_prefix_and_uses_buffers():
    torch.manual_seed(0)
    cfg = dataclasses.replace(tokenizer_config("debug-tiny-causal"), decoder_causal=False)
    model = Tokenizer1D(cfg).eval()
    assert model.decoder.buffer_tokens.shape == (4, cfg.dec_width) and model.decoder.prefix_head is None
    zq = torch.randn(1, cfg.seq_len, cfg.latent_dim, requires_grad=True)
    img = model.decode(zq)
    (grad,) = torch.autograd.grad(img[..., :8, :8].sum(), zq)
    assert grad[0, : cfg.num_prefix_tokens].eq(0).all()  # prefix latents removed in stage 2
    assert grad[0, -1].abs().sum() > 0  # top-left patch sees the last latent (bidirectional)
    causal = Tokenizer1D(tokenizer_config("debug-tiny-causal"))
    assert causal.decoder.buffer_tokens is None
    # stage 2 can take the stage-1 encoder and quantizer as they are
    model.encoder.load_state_dict(causal.encoder.state_dict())
    model.quantizer.load_state_dict(causal.quantizer.state_dict())


def test_grad_checkpointing_same_output_and_grads():
    cfg = tokenizer_config("debug-tiny")
    torch.manual_seed(0)
    a = Tokenizer1D(cfg)
    b = Tokenizer1D(dataclasses.replace(cfg, grad_checkpointing=True))
    b.load_state_dict(a.state_dict())
    img = _images()
    la, lb = F.mse_loss(a(img).image, img), F.mse_loss(b(img).image, img)
    la.backward(), lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(a.encoder.patch_embed.weight.grad, b.encoder.patch_embed.weight.grad)


def test_presets_sizes_on_meta():
    for name in ("eostok-tok", "eostok-tok-h", "alitok-tok-paper", "alitok-tok-code", "debug-tiny", "debug-tiny-causal"):
        assert name in TOKENIZER_PRESETS
    assert tokenizer_config("alitok-tok-code").seq_len == 273
    assert tokenizer_config("alitok-tok-paper").num_buffer_tokens == 64
    cfg = tokenizer_config("eostok-tok")
    assert (cfg.quantizer.type, cfg.quantizer.codebook_size, cfg.latent_dim, cfg.num_latent_tokens) == ("ibq", 4096, 64, 256)
    with torch.device("meta"):
        eos = Tokenizer1D(cfg)
        ali = Tokenizer1D(dataclasses.replace(tokenizer_config("alitok-tok-paper"), decoder_causal=False))
    n_enc = sum(p.numel() for p in eos.encoder.parameters())
    assert 85e6 < n_enc < 88e6  # ViT-B sized encoder
    n_dec = sum(p.numel() for p in ali.decoder.parameters())
    assert 300e6 < n_dec < 310e6  # ViT-L sized decoder
    assert tokenizer_config("debug-tiny") is not tokenizer_config("debug-tiny")
    with pytest.raises(KeyError, match="unknown tokenizer preset"):
        tokenizer_config("nope")


def test_bad_inputs_have_clear_errors():
    model = Tokenizer1D(tokenizer_config("debug-tiny"))
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 32, 32\)"):
        model(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="quantized latents"):
        model.decode(torch.zeros(1, 15, 16))
    with pytest.raises(ValueError, match="hidden layer"):
        model.decode_full(torch.zeros(1, 16, 16), hidden_layer=5)
    with pytest.raises(ValueError, match="latent_dim"):
        Tokenizer1DConfig(latent_dim=32)
    with pytest.raises(ValueError, match="prefix"):
        dataclasses.replace(tokenizer_config("debug-tiny-causal"), num_prefix_tokens=2)


@pytest.mark.gpu
def test_cuda_bf16_forward_backward_and_causality():
    torch.manual_seed(0)
    cfg = tokenizer_config("debug-tiny-causal")
    model = Tokenizer1D(cfg).cuda()
    img = _images().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(img)
        loss = F.mse_loss(out.image.float(), img) + out.quant.loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0
    zq = torch.randn(1, cfg.seq_len, cfg.latent_dim, device="cuda", requires_grad=True)
    (g,) = torch.autograd.grad(model.decode(zq)[..., :8, :8].sum(), zq)  # top-left patch
    assert g[0, cfg.num_prefix_tokens + 1:].eq(0).all() and g[0, cfg.num_prefix_tokens].abs().sum() > 0


def test_token_mix_shortcuts_are_built_only_when_asked_and_carry_content():
    torch.manual_seed(0)
    base = tokenizer_config("debug-tiny")
    plain = Tokenizer1D(base)
    assert plain.encoder.latent_mix is None and plain.decoder.patch_mix is None
    mixed = Tokenizer1D(dataclasses.replace(base, token_mix=True))
    n_plain = sum(p.numel() for p in plain.parameters())
    n_mixed = sum(p.numel() for p in mixed.parameters())
    assert n_mixed - n_plain == 2 * base.num_latent_tokens * base.num_patches  # A (L x N) and B (N x L)
    img = _images()
    F.mse_loss(mixed(img).image, img).backward()
    assert mixed.encoder.latent_mix.grad.abs().sum() > 0 and mixed.decoder.patch_mix.grad.abs().sum() > 0
    causal = Tokenizer1D(dataclasses.replace(tokenizer_config("debug-tiny-causal"), token_mix=True))
    assert causal.decoder.mix_mask.shape == causal.decoder.patch_mix.shape  # the causal mask's patch rows
    assert causal.decoder.patch_mix[causal.decoder.mix_mask == 0].eq(0).all()


def test_official_latents_layout_reads_or_drops_the_prefix():
    """decoder_layout="latents" (AliTok's official decoder): latent i -> patch i, no mask tokens; a
    bidirectional decoder reads the prefix codes only with decoder_reads_prefix (the code's stage 2;
    the paper drops them: `unread_prefix`), and its output never depends on codes it does not read."""
    import dataclasses

    from system.models.tokenizer1d import Tokenizer1D, tokenizer_config

    base = dataclasses.replace(tokenizer_config("debug-tiny-alitok"), decoder_causal=False)
    for reads in (True, False):
        cfg = dataclasses.replace(base, decoder_reads_prefix=reads)
        assert cfg.unread_prefix == (0 if reads else cfg.num_prefix_tokens)
        dec = Tokenizer1D(cfg).decoder.eval()
        assert dec.mask_token is None and dec.buffer_tokens.shape[0] == cfg.num_buffer_tokens
        zq = torch.randn(2, cfg.seq_len, cfg.latent_dim, requires_grad=True)
        out = dec(zq)
        assert out.image.shape == (2, 3, 32, 32) and out.prefix_row is None
        (g,) = torch.autograd.grad(out.image.sum(), zq)
        per = g[0].abs().sum(-1)
        assert per[cfg.num_prefix_tokens:].gt(0).all()
        assert per[:cfg.num_prefix_tokens].gt(0).all() if reads else per[:cfg.num_prefix_tokens].eq(0).all()
    with pytest.raises(ValueError, match="num_latent_tokens must be the 16 patches"):
        dataclasses.replace(base, num_latent_tokens=8)
    with pytest.raises(ValueError, match="decoder_layout 'tokens' unknown"):
        dataclasses.replace(base, decoder_layout="tokens")
