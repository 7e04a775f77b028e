import torch

from system.models.adapters_vq import USAGE_BUFFER_KEY, infer_config, load_llamagen_vq, to_llamagen_state_dict
from system.models.vqgan import VQGANConfig, VQModel

SMALL = VQGANConfig(codebook_size=64, codebook_dim=4, ch=32, ch_mult=(1, 2), z_channels=32, num_res_blocks=1)


def _public_vq16_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of LlamaGen's VQ-16 checkpoint, written out from its architecture
    (taming encoder/decoder, ch 128, ch_mult 1,1,2,2,4, z 256, 2 res blocks, codebook 16384x8)."""
    ch, mult, z, k, d = 128, (1, 1, 2, 2, 4), 256, 16384, 8
    out: dict[str, tuple[int, ...]] = {}

    def conv(p, ci, co, ks):
        out[p + ".weight"], out[p + ".bias"] = (co, ci, ks, ks), (co,)

    def norm(p, c):
        out[p + ".weight"], out[p + ".bias"] = (c,), (c,)

    def res(p, ci, co):
        norm(p + ".norm1", ci), conv(p + ".conv1", ci, co, 3), norm(p + ".norm2", co), conv(p + ".conv2", co, co, 3)
        if ci != co:
            conv(p + ".nin_shortcut", ci, co, 1)

    def attn(p, c):
        norm(p + ".norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{p}.{n}", c, c, 1)

    conv("encoder.conv_in", 3, ch, 3)
    ci = ch
    for i, m in enumerate(mult):
        for j in range(2):
            res(f"encoder.conv_blocks.{i}.res.{j}", ci, ch * m)
            ci = ch * m
            if i == len(mult) - 1:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", ci)
        if i != len(mult) - 1:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", ci, ci, 3)
    res("encoder.mid.0", ci, ci), attn("encoder.mid.1", ci), res("encoder.mid.2", ci, ci)
    norm("encoder.norm_out", ci), conv("encoder.conv_out", ci, z, 3)
    conv("decoder.conv_in", z, ci, 3)
    res("decoder.mid.0", ci, ci), attn("decoder.mid.1", ci), res("decoder.mid.2", ci, ci)
    for idx, i in enumerate(reversed(range(len(mult)))):
        for j in range(3):
            res(f"decoder.conv_blocks.{idx}.res.{j}", ci, ch * mult[i])
            ci = ch * mult[i]
            if i == len(mult) - 1:
                attn(f"decoder.conv_blocks.{idx}.attn.{j}", ci)
        if i != 0:
            conv(f"decoder.conv_blocks.{idx}.upsample.conv", ci, ci, 3)
    norm("decoder.norm_out", ci), conv("decoder.conv_out", ci, 3, 3)
    out["quantize.embedding.weight"] = (k, d)
    out[USAGE_BUFFER_KEY] = (65536,)
    conv("quant_conv", z, d, 1), conv("post_quant_conv", d, z, 1)
    return out


def test_default_config_matches_public_vq16_layout_on_meta():
    with torch.device("meta"):
        model = VQModel()
    ours = {k: tuple(v.shape) for k, v in to_llamagen_state_dict(model).items()}
    assert ours == _public_vq16_layout()
    n_params = sum(p.numel() for p in model.parameters())
    assert 71.5e6 < n_params < 72.5e6  # LlamaGen reports 72M for VQ-16 (ours: 71.88M)


def test_roundtrip_through_public_layout_file(tmp_path):
    torch.manual_seed(0)
    model = VQModel(SMALL).eval()
    with torch.no_grad():  # make non-trivial weights everywhere (GroupNorm affine too)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": to_llamagen_state_dict(model)}, path)
    loaded = load_llamagen_vq(path)
    assert loaded.cfg.ch_mult == (1, 2) and loaded.cfg.codebook_size == 64 and loaded.cfg.num_res_blocks == 1
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = model.encode(img)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.long
    assert torch.equal(loaded.encode(img), codes)
    rec = model.decode_codes(codes)
    assert rec.shape == (2, 3, 16, 16)
    torch.testing.assert_close(loaded.decode_codes(codes), rec)
    torch.testing.assert_close(loaded.decode_codes(codes.flatten(1)), rec)
    rec2, q = loaded(img)
    torch.testing.assert_close(rec2, rec, rtol=1e-4, atol=1e-4)
    assert torch.equal(q.codes.view(2, 8, 8), codes)


def test_adapter_strips_ddp_prefix_and_rejects_foreign_dicts():
    model = VQModel(SMALL)
    sd = {"module." + k: v for k, v in to_llamagen_state_dict(model).items()}
    loaded = load_llamagen_vq({"model": sd})
    assert torch.equal(loaded.quantize.embedding.weight, model.quantize.embedding.weight)
    assert infer_config(model.state_dict()).z_channels == 32
    try:
        load_llamagen_vq({"weight": torch.zeros(1)})
    except ValueError as e:
        assert "LlamaGen VQ" in str(e)
    else:
        raise AssertionError("a foreign state dict must be rejected")


def test_gradients_flow_and_codes_are_l2_normalised():
    torch.manual_seed(0)
    model = VQModel(SMALL)
    img = torch.rand(1, 3, 16, 16) * 2 - 1
    rec, q = model(img)
    (rec.square().mean() + q.loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    torch.testing.assert_close(model.quantize.codebook.norm(dim=-1), torch.ones(64))
