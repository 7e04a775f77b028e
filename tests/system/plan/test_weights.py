"""Plan mode (system/models/weights.py): every loader of weights from a path, a hub name or an export
builds its architecture without reading a weight file (the readers are made to fail here) and
records what a real run will read and whether it exists; outside plan mode loaders read as before."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from system.models import weights
from system.plan.trace import fake_build, fake_mode


@pytest.fixture
def no_weight_reads(monkeypatch):
    block_weight_reads(monkeypatch)


def block_weight_reads(monkeypatch) -> None:
    """Every way this code base reads weights raises."""
    import safetensors
    import safetensors.torch
    import transformers
    from diffusers import ModelMixin

    import system.models.artifacts as artifacts

    def fail(*args, **kwargs):
        raise AssertionError(f"a weight file was read in plan mode: {args[:1]}")

    monkeypatch.setattr(torch, "load", fail)
    monkeypatch.setattr(safetensors.torch, "load_file", fail)
    monkeypatch.setattr(safetensors, "safe_open", fail)
    monkeypatch.setattr(artifacts, "load_safetensors_bytes", fail)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(fail))
    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(fail))
    read = artifacts.read_bytes
    monkeypatch.setattr(artifacts, "read_bytes", lambda url, *a, **k: fail(url) if url.endswith(".safetensors") else read(url, *a, **k))


def test_need_outside_and_inside_plan_mode(tmp_path):
    assert weights.need("x", "/nowhere") and not weights.planning_now()
    (tmp_path / "w.pth").write_bytes(b"")
    with weights.planning() as refs:
        assert not weights.need("a", str(tmp_path / "w.pth"))
        assert not weights.need("b", "/nowhere/w.pth")
        assert not weights.need("c", "s3://bucket/w.pth")
        assert not weights.need("d", "facebook/dinov2-base", hub=True)
        assert not weights.need("a", str(tmp_path / "w.pth"))  # recorded once
        with weights.planning() as inner:
            weights.need("e", "/x")
        assert [r.what for r in inner] == ["e"]
    assert [(r.what, r.exists) for r in refs] == [("a", True), ("b", False), ("c", None), ("d", None), ("e", False)]
    assert refs[3].where == "hub:facebook/dinov2-base"


def test_unset_weights_are_listed_by_a_dry_run_and_errors_in_a_real_runs_checks():
    """A key naming no weights at all: the dry run lists it, a real run's pre-run checks stop on it
    (CI found the SemTok pipeline training its VAE step before it stopped on an unset teacher)."""
    with pytest.raises(ValueError, match="no teacher"):
        weights.unset("teacher", "method.teacher.path", "no teacher")
    with weights.planning() as refs:
        weights.unset("teacher", "method.teacher.path", "no teacher")
    assert [(r.what, r.where, r.exists) for r in refs] == [("teacher", "<not set: method.teacher.path>", False)]
    with weights.planning(unset_raises=True):
        with weights.planning():  # nested blocks (the traces inside) keep the enclosing rule
            with pytest.raises(ValueError, match="no teacher"):
                weights.unset("teacher", "method.teacher.path", "no teacher")
            assert not weights.need("e", "/x")  # weights at a path are still only recorded
    with weights.planning() as refs:
        weights.unset("teacher", "method.teacher.path", "no teacher")  # back to listing
    assert len(refs) == 1


def test_perceptual_nets_record_their_paths(no_weight_reads, tmp_path):
    from system.losses.convnext_perceptual import ConvNeXtPerceptual
    from system.losses.lpips import LPIPS
    from system.losses.resnet_perceptual import ResNetPerceptual

    vgg = tmp_path / "vgg16.pth"
    vgg.write_bytes(b"not read")
    with weights.planning() as refs:
        lp = LPIPS(str(vgg), "/missing/vgg.pth")
        cn = ConvNeXtPerceptual("/missing/convnext_small.pth", size="debug")
        rn = ResNetPerceptual(str(tmp_path), size="debug")
    assert lp.pretrained and cn.pretrained and rn.pretrained  # a real run has weights: no random-weight warning
    assert [(r.what, r.exists) for r in refs] == [("LPIPS VGG16 trunk", True), ("LPIPS v0.1 linear heads", False),
                                                  ("ConvNeXt-debug weights", False), ("ResNet-debug weights", True)]


def test_teachers_from_hub_names_and_local_configs(no_weight_reads, tmp_path):
    from transformers import Dinov2Config

    from system.losses.teachers import Teacher, TeacherConfig

    Dinov2Config(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # a config, no weights
    with weights.planning() as refs, fake_mode(), fake_build():
        dino = Teacher(TeacherConfig(kind="dinov2", hub_name="facebook/dinov2-base"))
        sig = Teacher(TeacherConfig(kind="siglip", hub_name="google/siglip2-so400m-patch16-256"))
        local = Teacher(TeacherConfig(kind="dinov2", path=str(tmp_path)))
    assert (dino.dim, dino.patch_size, sig.dim, sig.image_size, sig.grid, local.dim) == (768, 14, 1152, 256, (16, 16), 48)
    assert sum(p.numel() for p in sig.model.parameters()) > 400e6  # so400m
    assert [(r.where, r.exists) for r in refs] == [("hub:facebook/dinov2-base", None),
                                                   ("hub:google/siglip2-so400m-patch16-256", None), (str(tmp_path), True)]
    with weights.planning(), pytest.raises(ValueError, match="no built-in architecture"):
        Teacher(TeacherConfig(kind="dinov2", hub_name="someone/vit-base"))


def test_vae_mmdit_and_exports(no_weight_reads, tmp_path):
    from system.config import LatentVAEConfig
    from system.models.artifacts import Artifact, save_export
    from system.sampling.generators import load_pair
    from system.models.gpt import GPT
    from system.models.registry import gpt_config
    from system.models.tokenizer1d import Tokenizer1D, tokenizer_config
    from system.models.vae import SD35_VAE_CONFIG, TINY_VAE_CONFIG, build_latent_vae

    folder = tmp_path / "sd35" / "vae"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **TINY_VAE_CONFIG}))
    tok = Tokenizer1D(tokenizer_config("debug-tiny"))
    gpt = GPT(dataclasses.replace(gpt_config("debug-tiny"), vocab_size=tok.cfg.quantizer.num_codes, block_size=tok.cfg.seq_len))
    export = str(tmp_path / "export")
    save_export(export, {"tokenizer": Artifact.of("tokenizer1d", tok), "ar": Artifact.of("gpt", gpt)})  # writes: allowed
    with weights.planning() as refs, fake_mode(), fake_build():
        local = build_latent_vae(LatentVAEConfig(path=str(tmp_path / "sd35")))
        hub = build_latent_vae(LatentVAEConfig(hub_name="stabilityai/stable-diffusion-3.5-medium"))
        t, g = load_pair(export)
    assert local.vae.config.block_out_channels == TINY_VAE_CONFIG["block_out_channels"]
    assert hub.vae.config.block_out_channels == SD35_VAE_CONFIG["block_out_channels"] and hub.latent_channels == 16
    assert sum(p.numel() for p in hub.vae.parameters()) == 83_819_683
    assert t.vocab_size == tok.cfg.quantizer.num_codes and g.block_size == gpt.cfg.block_size
    assert [r.what for r in refs] == ["VAE", "VAE", "tokenizer 'tokenizer' of an export", "generator 'ar' of an export"]


def test_llamagen_checkpoints(no_weight_reads):
    from system.sampling.generators import load_llamagen

    with weights.planning() as refs, fake_mode(), fake_build():
        tok, gen = load_llamagen("/ckpt/c2i_XXL_384.pt", "/ckpt/vq_ds16_c2i.pt", block_size=576)
        with pytest.raises(ValueError, match="llamagen_preset"):
            load_llamagen("/ckpt/policy.pt", "/ckpt/vq_ds16_c2i.pt")
    assert gen.seq_len == 576 and gen.vocab_size == tok.vocab_size == 16384
    assert sum(p.numel() for p in gen.parameters()) > 1.3e9  # llamagen-xxl
    assert [r.what for r in refs][:2] == ["LlamaGen VQ", "LlamaGen c2i GPT"]


@pytest.mark.parametrize("name", ["alitok_stage2", "semtok_stage2", "vapi", "semtok_stage1"])
def test_methods_reading_exports_plan_without_weights(tiny, monkeypatch, name):
    """Stage 2 reads stage 1's weights, VAπ its export, SemTok stage I its VAE (and SD3.5's transformer
    with decoder_init): in plan mode only their model.json is read, and the modules have the shapes
    of a real run's."""
    from system.methods import registry
    from system.plan.trace import build_fake

    case = tiny[name]
    entry = registry.for_config(case.exp.method)
    real = entry.method(case.exp.method, case.data).modules()  # outside plan mode the weights are read
    block_weight_reads(monkeypatch)
    cfg = case.exp.method
    if name == "semtok_stage1":
        cfg = dataclasses.replace(cfg, decoder_init="/missing/stable-diffusion-3.5-medium")
    fm = build_fake(entry.method, cfg, case.data)

    def shapes(specs):
        return {n: sorted((k, tuple(v.shape)) for k, v in s.module.state_dict().items()) for n, s in specs.items()}

    assert shapes(fm.specs) == shapes(real)
    assert fm.weights and all(w["exists"] for w in fm.weights if not w["where"].startswith("/missing"))
    if name == "semtok_stage1":
        assert {"what": "SD3 transformer (decoder init)", "where": "/missing/stable-diffusion-3.5-medium",
                "exists": False} in fm.weights
