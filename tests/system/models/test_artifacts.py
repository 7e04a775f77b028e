"""Exports with kinds: write -> read round trips (export I/O: system/models/artifacts.py; tokenizer
kinds: system/models/tokenizers.py; generator kinds: system/sampling/generators.py), the old
model.json, LlamaGen checkpoints and exports, and the registries' errors."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from system.models import tokenizers
from system.models.adapters_llamagen_gpt import to_llamagen_gpt
from system.models.adapters_vq import VQFrozen, load_llamagen_vq, to_llamagen_state_dict
from system.models.artifacts import (
    MODEL_JSON, Artifact, check_fit, export_writer, load_part, read_model_json, save_export, write_export, write_model_json)
from system.models.gpt import GPT
from system.models.registry import gpt_config
from system.models.tokenizer1d import Tokenizer1D, build_tokenizer1d, tokenizer_config
from system.models.tokenizers import frozen_tokenizer, load_tokenizer, register_tokenizer, tokenizer_kinds
from system.models.vqgan import VQGANConfig, VQModel
from system.sampling.ar import generate
from system.sampling.generators import generator_kinds, load_generator, load_llamagen, load_pair
from system.sampling.gpt_generator import GPTGenerator

TINY_VQ = VQGANConfig(codebook_size=64, codebook_dim=8, ch=32, ch_mult=(1, 2, 2, 2), z_channels=32, num_res_blocks=1)


def _ours(seed: int = 0) -> tuple[Tokenizer1D, GPT]:
    torch.manual_seed(seed)
    tc = tokenizer_config("debug-tiny")
    ar = GPT(gpt_config("debug-tiny", vocab_size=tc.quantizer.num_codes, block_size=tc.seq_len, code_dim=tc.latent_dim,
                        num_classes=8))
    torch.nn.init.normal_(ar.output.weight, std=0.5)  # the zero-initialised head would give uniform logits
    return Tokenizer1D(tc).eval(), ar.eval()


def _llamagen(seed: int = 0) -> tuple[VQModel, GPT]:
    torch.manual_seed(seed)
    ar = GPT(gpt_config("debug-tiny", vocab_size=64, block_size=16, num_classes=8))  # 32 px / 8 = 4x4 grid
    torch.nn.init.normal_(ar.output.weight, std=0.5)
    return VQModel(TINY_VQ).eval(), ar.eval()


def _images(n: int = 2, res: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_round_trip_tokenizer1d_gpt(tmp_path):
    tok, ar = _ours()
    arts = {"tokenizer": Artifact.of("tokenizer1d", tok), "ar": Artifact.of("gpt", ar)}
    save_export(str(tmp_path), arts)
    assert json.loads((tmp_path / MODEL_JSON).read_text()) == {
        "tokenizer": {"kind": "tokenizer1d", "config": dataclasses.asdict(tok.cfg)},
        "ar": {"kind": "gpt", "config": dataclasses.asdict(ar.cfg)},
    }
    ftok, gen = load_pair(str(tmp_path))
    x, labels = _images(), torch.tensor([1, 5])
    codes = ftok.encode(x)
    quant, _ = tok.encode(x)
    assert torch.equal(codes, quant.codes) and codes.shape == (2, tok.cfg.seq_len)
    assert torch.equal(ftok.decode(codes), tok.decode_codes(codes))
    assert torch.equal(ftok.reconstruct(x), tok(x).image)
    assert torch.equal(gen(codes, labels), ar(codes, labels, codebook=tok.codebook))
    want = generate(ar, labels, cfg_scale=2.0, seed=3, codebook=tok.codebook, top_k=8)
    assert torch.equal(gen.sample(labels, cfg_scale=2.0, seed=3, top_k=8), want)
    assert (ftok.vocab_size, ftok.image_size, ftok.num_tokens(32), ftok.image_size_for(16)) == (64, 32, 16, 32)
    assert (gen.vocab_size, gen.num_classes, gen.block_size, gen.seq_len) == (64, 8, 16, 16)
    # frozen tokenizer, trainable generator whose state dict holds the AR weights only
    assert not any(p.requires_grad for p in ftok.parameters()) and not ftok.train().training
    assert all(p.requires_grad for p in gen.ar.parameters())
    assert set(gen.state_dict()) == {f"ar.{k}" for k in ar.state_dict()}
    check_fit(gen, ftok, 32)


def test_ema_weights_load_first_and_metadata(tmp_path):
    tok, ar = _ours()
    arts = {"tokenizer": Artifact.of("tokenizer1d", tok), "ar": Artifact.of("gpt", ar)}
    ema = {"tokenizer": arts["tokenizer"],
           "ar": Artifact("gpt", arts["ar"].config, {k: v + 1 for k, v in ar.state_dict().items()})}
    files: dict[str, bytes] = {}
    write = files.__setitem__
    write_export(write, arts, metadata={"run_name": "t"})
    write_export(write, ema, suffix="_ema")
    write_model_json(write, arts)
    assert sorted(files) == ["ar.safetensors", "ar_ema.safetensors", "model.json", "tokenizer.safetensors",
                             "tokenizer_ema.safetensors"]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ar.safetensors"), "pt") as f:
        assert f.metadata() == {"run_name": "t", "part": "ar", "kind": "gpt"}
    key = "output.weight"
    assert torch.equal(load_part(str(tmp_path), "ar")[key], ar.state_dict()[key] + 1)
    assert torch.equal(load_part(str(tmp_path), "ar", ema=False)[key], ar.state_dict()[key])
    _, gen = load_pair(str(tmp_path), ema=False)
    assert torch.equal(gen.ar.output.weight, ar.output.weight)


def test_old_model_json_still_loads(tmp_path):
    tok, ar = _ours()
    write_export(export_writer(str(tmp_path)), {"tokenizer": Artifact.of("tokenizer1d", tok),
                                                "ar": Artifact.of("gpt", ar)})
    old = {"tokenizer": dataclasses.asdict(tok.cfg), "ar": dataclasses.asdict(ar.cfg)}
    (tmp_path / MODEL_JSON).write_text(json.dumps(old))
    parts = read_model_json(str(tmp_path))
    assert parts == {"tokenizer": {"kind": "tokenizer1d", "config": old["tokenizer"]},
                     "ar": {"kind": "gpt", "config": old["ar"]}}
    ftok, gen = load_pair(str(tmp_path))
    x = _images()
    assert torch.equal(ftok.encode(x), tok.encode(x)[0].codes)
    raw = build_tokenizer1d(parts["tokenizer"]["config"], load_part(str(tmp_path), "tokenizer"))
    assert isinstance(raw, Tokenizer1D) and raw.codebook.requires_grad  # raw builders stay trainable


def test_llamagen_checkpoints_load_and_sample(tmp_path):
    vq, ar = _llamagen()
    torch.save({"model": to_llamagen_gpt(ar.state_dict()), "steps": 1}, tmp_path / "c2i_tiny.pt")
    torch.save({"model": to_llamagen_state_dict(vq)}, tmp_path / "vq_tiny.pt")
    tok, gen = load_llamagen(str(tmp_path / "c2i_tiny.pt"), str(tmp_path / "vq_tiny.pt"), preset="debug-tiny",
                             vocab_size=64, block_size=16, num_classes=8)
    assert tok.codebook is None and gen.codebook is None and tok.image_size is None
    check_fit(gen, tok, 32)
    assert tok.image_size_for(gen.seq_len) == 32
    labels = torch.tensor([0, 7, 3])
    codes = gen.sample(labels, cfg_scale=1.5, cfg_schedule="linear", temperature=0.9, seed=0)
    assert codes.shape == (3, 16) and torch.equal(codes, generate(ar, labels, cfg_scale=1.5, schedule="linear",
                                                                   temperature=0.9, seed=0))
    images = tok.decode(codes)
    assert images.shape == (3, 3, 32, 32) and torch.equal(images, vq.decode_codes(codes))
    x = _images()
    assert torch.equal(tok.encode(x), vq.encode(x).flatten(1))
    assert torch.equal(tok.reconstruct(x), vq(x)[0])
    with pytest.raises(ValueError, match="vocabulary is 32"):
        check_fit(GPTGenerator(GPT(gpt_config("debug-tiny", vocab_size=32, block_size=16))), tok, 32)


def test_unknown_kind_and_registry_errors(tmp_path):
    tok, ar = _ours()
    save_export(str(tmp_path), {"tokenizer": Artifact("semtok-nope", {}, {}), "ar": Artifact.of("gpt", ar)})
    known = r"registered tokenizer kinds: \['alitok-released', 'llamagen-vq', 'semtok', 'tokenizer1d'\]"
    with pytest.raises(ValueError, match=rf"tokenizer kind 'semtok-nope', which is not registered; {known}"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match=r"GPTConfig.code_dim=16\): pass the tokenizer's codebook"):
        load_generator(str(tmp_path))  # this GPT embeds codes through a codebook
    with pytest.raises(KeyError, match=r"no part 'decoder'; it has \['ar', 'tokenizer'\]"):
        load_tokenizer(str(tmp_path), part="decoder")
    with pytest.raises(ValueError, match="already registered"):
        register_tokenizer("tokenizer1d", lambda config, sd: None)
    (tmp_path / MODEL_JSON).write_text(json.dumps({"vae": {"ch": 3}}))
    with pytest.raises(ValueError, match="part 'vae' has no kind"):
        read_model_json(str(tmp_path))
    bad = dataclasses.asdict(ar.cfg) | {"n_layers": 3}
    save_export(str(tmp_path), {"ar": Artifact("gpt", bad, ar.state_dict())})
    with pytest.raises(ValueError, match=r"unknown GPTConfig field\(s\) \['n_layers'\]"):
        load_generator(str(tmp_path), frozen_tokenizer(tok))
    with pytest.raises(FileNotFoundError, match="export/ folder of a finished run"):
        read_model_json(str(tmp_path / "missing"))


def test_a_registered_kind_plugs_in(tmp_path, monkeypatch):
    """A new tokenizer kind: registered once, it loads, samples and checks fit like the built-in ones."""
    monkeypatch.setattr(tokenizers, "_TOKENIZERS", dict(tokenizers._TOKENIZERS))
    register_tokenizer("vq-renamed", lambda config, sd: VQFrozen(load_llamagen_vq(sd, VQGANConfig(**config))))
    vq, ar = _llamagen()
    save_export(str(tmp_path), {"tokenizer": Artifact.of("vq-renamed", vq), "ar": Artifact.of("gpt", ar)})
    tok, gen = load_pair(str(tmp_path))
    assert tokenizer_kinds() == ["alitok-released", "llamagen-vq", "semtok", "tokenizer1d", "vq-renamed"]
    assert generator_kinds() == ["alitok-released", "gpt"]
    assert tok.decode(gen.sample(torch.tensor([1]), seed=0)).shape == (1, 3, 32, 32)


def test_part_sampler_on_a_llamagen_export(tmp_path):
    """An export of a LlamaGen model (kinds llamagen-vq / gpt) samples through PartSampler."""
    from system.config.eval_schema import SampleConfig
    from system.eval.sample_parts import PartSampler, read_part
    from system.eval.sampling_plan import SamplingPlan

    vq, ar = _llamagen()
    export = str(tmp_path / "export")
    save_export(export, {"tokenizer": Artifact.of("llamagen-vq", vq), "ar": Artifact.of("gpt", ar)})
    assert read_model_json(export)["tokenizer"]["config"]["ch_mult"] == [1, 2, 2, 2]
    plan = SamplingPlan(num_per_class=2, num_classes=3, part_size=4, seed=0)
    sampler = PartSampler(SampleConfig(export_url=export, batch_size=4), device="cpu")
    part = plan.part(0)
    images, codes = sampler.sample(part)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8 and codes.shape == (4, 16)
    labels = torch.tensor(part.labels)
    assert np.array_equal(codes, generate(ar, labels, seed=part.seed).numpy())
    assert sampler.write_part(part, str(tmp_path / "out")) == 4
    assert np.array_equal(read_part(str(tmp_path / "out"), part)["images"], images)
