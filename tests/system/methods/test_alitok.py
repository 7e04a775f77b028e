"""AliTok's tokenizer stages on tiny models: every term finite, gradients where they must be and
nowhere else, the aux loss reaching only the prefix path, causality of the prefix decoding, the
codebook re-initialisation identical on every rank from gathered codes and features, stage 2's
frozen encoder/quantizer/latent queries and the export round trips."""
from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from system.config import AliTokStage1Config, AliTokStage2Config, ConvNeXtNetConfig, LPIPSConfig
from system.methods.alitok import AliTokStage1, AliTokStage2
from system.methods.base import Collective, DataSpec
from system.models import artifacts as A
from system.models.tokenizers import load_tokenizer

RES = 32  # debug-tiny-causal: 8 px patches, a 4 x 4 grid, 16 latents + 4 prefix tokens, VQ 64 x 16


def _stage1(**kw) -> AliTokStage1:
    kw.setdefault("tokenizer", "debug-tiny-causal")
    kw.setdefault("lpips_net", LPIPSConfig(random_init=True))
    kw.setdefault("convnext", 0.0)  # the official ConvNeXt-S term needs weights (test_stage1_convnext_term...)
    return AliTokStage1(AliTokStage1Config(**kw), DataSpec(resolution=RES, num_classes=3))


def _batch(b=4, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(b, 3, RES, RES, generator=g) * 2 - 1, "label": torch.zeros(b, dtype=torch.long)}


def _mods(method) -> dict:
    return {n: s.module for n, s in method.modules().items()}


def _grad_norm(module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_stage1_every_term_finite_and_gradients_reach_every_part():
    torch.manual_seed(0)
    m = _stage1(gan_start_step=0)
    mods = _mods(m)
    gen, disc = mods["gen"], mods["disc"]
    out = m.step("gen", mods, _batch(), 5, {})
    terms = {k.split("/", 1)[1] for k in out.metrics if k.startswith("loss/")}
    assert {"l2", "lpips", "quant_commit", "quant_codebook", "aux_l2", "aux_lpips", "gan_g", "total"} <= terms
    assert all(torch.is_tensor(v) and torch.isfinite(v) for v in out.metrics.values())  # on device: no host sync
    for k in ("psnr", "prefix_psnr", "codebook_usage", "codebook_perplexity", "codebook_reinit"):
        assert k in out.metrics
    out.loss.backward()
    tok = gen.tokenizer
    for part in (tok.encoder.patch_embed, tok.encoder.vit, tok.decoder.vit, tok.decoder.to_pixels, tok.decoder.prefix_head):
        assert _grad_norm(part) > 0, type(part).__name__
    assert tok.encoder.latent_tokens.grad.abs().sum() > 0
    assert tok.quantizer.embedding.weight.grad.abs().sum() > 0  # the codebook loss
    assert all(p.grad is None for p in disc.parameters()), "the generator step must not touch D's grads"
    d = m.step("disc", mods, _batch(), 5, out.aux)
    assert torch.isfinite(d.loss)
    d.loss.backward()
    assert _grad_norm(disc) > 0 and m.phases() == ["gen", "disc"]
    assert _mods(_stage1(gan=0.0)).keys() == {"gen"} and _stage1(gan=0.0).phases() == ["gen"]


def test_stage1_convnext_term_is_finite_and_frozen():
    """The official ConvNeXt-S perceptual term (tiny random net here): a finite `loss/convnext`, its
    gradient reaches the tokenizer, the network stays frozen and `frozen_parts` holds it."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM"):
        m = _stage1(lpips=0.0, gan=0.0, convnext=0.1, convnext_net=ConvNeXtNetConfig(random_init=True, size="debug"))
    assert m.convnext in m.frozen_parts()
    mods = _mods(m)
    out = m.step("gen", mods, _batch(), 0, {})
    assert torch.isfinite(out.metrics["loss/convnext"]) and out.metrics["loss/convnext"] > 0
    out.loss.backward()
    assert _grad_norm(mods["gen"].tokenizer.decoder.to_pixels) > 0
    assert all(not p.requires_grad and p.grad is None for p in m.convnext.parameters())


def test_aux_loss_reaches_only_the_prefix_path():
    """With one prefix token more than a row (as the code's 17 at 256 px) the aux loss is the
    official MSE of the prefix patches + LPIPS of the prefix composite: its gradient reaches the
    prefix latents (and through them the encoder), the decoder and the prefix head, and never the
    image latents, the patch head or the mask tokens."""
    torch.manual_seed(0)
    m = _stage1(tokenizer_overrides={"num_prefix_tokens": 5}, aux=1.0)
    gen = _mods(m)["gen"]
    tok = gen.tokenizer
    P, p = m.tok_cfg.num_prefix_tokens, m.tok_cfg.patch_size
    seen = {}

    def keep(module, args, out):  # the decoder's input: quantized latents (B, P + L, D)
        seen["zq"] = out.quantized
        out.quantized.retain_grad()

    tok.quantizer.register_forward_hook(keep)
    x = _batch()["image"]
    out = gen(x)
    assert out.prefix_lead.shape == (4, 3, p, p) and out.prefix_row.shape == (4, 3, p, RES)
    terms = m.aux_terms(x, out)
    assert set(terms) == {"aux_l2", "aux_lpips"}
    target = torch.cat([x[:, :, :p, :p], x[:, :, :p]], -1)  # "first patch + first row"
    pred = torch.cat([out.prefix_lead, out.prefix_row], -1)
    want = m.cfg.aux * P / m.tok_cfg.num_patches * torch.nn.functional.mse_loss(pred, target) / 4  # on [0, 1] images
    torch.testing.assert_close(terms["aux_l2"], want)
    sum(terms.values()).backward()
    g = seen["zq"].grad[0].abs().sum(-1)  # per token
    assert g[:P].gt(0).all() and g[P:].eq(0).all()
    dec = tok.decoder
    assert _grad_norm(dec.prefix_head) > 0 and _grad_norm(dec.vit) > 0 and _grad_norm(tok.encoder) > 0
    assert _grad_norm(dec.to_pixels) == 0
    for t in (dec.mask_token, dec.patch_pos):
        assert t.grad is None or t.grad.abs().sum() == 0


def test_prefix_decoding_is_causal():
    """Each leading prefix token decodes its patch from the prefix tokens up to it; the first row
    from the prefix tokens only (the image patches' causality: test_tokenizer1d.py)."""
    torch.manual_seed(0)
    m = _stage1(tokenizer_overrides={"num_prefix_tokens": 6})
    dec = _mods(m)["gen"].tokenizer.decoder.eval()
    P, p = m.tok_cfg.num_prefix_tokens, m.tok_cfg.patch_size
    zq = torch.randn(1, m.tok_cfg.seq_len, m.tok_cfg.latent_dim, requires_grad=True)
    out = dec(zq)
    for j in range(P - m.tok_cfg.grid):
        (gj,) = torch.autograd.grad(out.prefix_lead[..., j * p:(j + 1) * p].sum(), zq, retain_graph=True)
        per_token = gj[0].abs().sum(-1)
        assert per_token[: j + 1].gt(0).all() and per_token[j + 1:].eq(0).all(), j
    (gr,) = torch.autograd.grad(out.prefix_row.sum(), zq)
    assert gr[0, P:].eq(0).all() and gr[0, :P].abs().sum() > 0


def test_probe_learns_next_tokens_of_the_codes_without_touching_the_tokenizer():
    torch.manual_seed(0)
    m = _stage1(lpips=0.0, gan=0.0, probe="debug-tiny", probe_overrides={"n_layer": 1})
    mods = _mods(m)
    assert m.phases() == ["gen", "probe"] and len(mods["probe"].layers) == 1
    pc = mods["probe"].cfg
    assert (pc.vocab_size, pc.prefix_tokens, pc.block_size, pc.rope) == (64, 4, 16, "mixed")
    b = _batch()
    out = m.step("gen", mods, b, 0, {})
    assert out.aux["codes"].shape == (4, m.tok_cfg.seq_len) and not out.aux["codes"].requires_grad
    p = m.step("probe", mods, b, 0, out.aux)
    assert torch.isfinite(p.loss) and 0 <= float(p.metrics["acc"]) <= 1
    p.loss.backward()
    assert _grad_norm(mods["probe"]) > 0 and _grad_norm(mods["gen"]) == 0
    with pytest.raises(ValueError, match="method.probe="):
        _stage1(probe="nope")


class _Board:
    """Rendezvous of thread 'ranks' for a fake collective."""

    def __init__(self, n: int):
        self.slots, self.barrier = [None] * n, threading.Barrier(n, timeout=60)

    def exchange(self, rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = t.detach().clone()
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()
        return parts


class ThreadCollective(Collective):
    """A 2-rank collective over threads (same semantics as the loop's DistCollective)."""

    def __init__(self, board: _Board, rank: int):
        self.board, self.rank, self.world_size = board, rank, len(board.slots)

    def all_reduce(self, t, op="sum"):
        parts = self.board.exchange(self.rank, t)
        if op == "max":
            return torch.stack(parts).amax(0)
        out = parts[0].clone()
        for q in parts[1:]:
            out += q
        return out / self.world_size if op == "mean" else out

    def all_gather(self, t):
        return torch.cat(self.board.exchange(self.rank, t))


def test_codebook_reinit_from_gathered_codes_is_identical_on_every_rank():
    """Two ranks, each with its half of the batch: after a step both have the same codebook, and
    the usage is the global one (both halves' codes), not either rank's (the split of the nearest-
    feature search over ranks equals the one-process search: test_quantizers.py)."""
    batch = _batch(b=8, seed=1)
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    board, results, ranks = _Board(2), [None, None], []
    for r in range(2):  # built here: torch's global RNG is shared by threads
        torch.manual_seed(0)  # the loop seeds every rank alike before modules()
        m = _stage1(lpips=0.0, gan=0.0)
        m.collective = ThreadCollective(board, r)
        ranks.append((m, _mods(m)["gen"]))
    assert torch.equal(ranks[0][1].tokenizer.codebook, ranks[1][1].tokenizer.codebook)

    def rank(r: int):
        m, gen = ranks[r]
        codes = []
        gen.tokenizer.quantizer.register_forward_hook(lambda mod, args, out: codes.append(out.codes))
        out = m.step("gen", {"gen": gen}, halves[r], 0, {})
        results[r] = (gen.tokenizer.quantizer, out.metrics, codes[0])

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (q0, m0, c0), (q1, m1, c1) = results
    assert torch.equal(q0.code_offset, q1.code_offset) and torch.equal(q0.usage_ema, q1.usage_ema)
    assert torch.equal(q0.codebook, q1.codebook) and q0.code_offset.abs().sum() > 0
    assert torch.equal(m0["codebook_usage"], m1["codebook_usage"])
    k = q0.cfg.codebook_size
    hist = torch.bincount(torch.cat([c0.flatten(), c1.flatten()]), minlength=k).float()
    torch.testing.assert_close(q0.usage_ema, (1 - q0.cfg.cluster_decay) * hist / hist.sum())  # global usage
    torch.testing.assert_close(m0["codebook_usage"], (hist > 0).float().mean())
    own = torch.bincount(c0.flatten(), minlength=k).float()
    assert not torch.allclose(q0.usage_ema, (1 - q0.cfg.cluster_decay) * own / own.sum())


def _stage1_export(folder, steps: int = 2) -> AliTokStage1:
    """A stage-1 export after `steps` training steps (the codebook moved by re-initialisation)."""
    torch.manual_seed(0)
    m = _stage1(lpips=0.0, gan=0.0)
    mods = _mods(m)
    opt = torch.optim.AdamW(mods["gen"].parameters(), lr=1e-3)
    for s in range(steps):
        out = m.step("gen", mods, _batch(seed=s), s, {})
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    A.save_export(str(folder), m.artifacts(mods))
    m.trained = mods["gen"]
    return m


def test_stage1_export_folds_the_codebook_and_loads(tmp_path):
    m = _stage1_export(tmp_path)
    gen = m.trained.eval()
    assert gen.tokenizer.quantizer.code_offset.abs().sum() > 0
    parts = A.read_model_json(str(tmp_path))
    assert parts["tokenizer"]["kind"] == "tokenizer1d"
    q = parts["tokenizer"]["config"]["quantizer"]
    assert q["cluster_decay"] == 0 and parts["tokenizer"]["config"]["decoder_causal"] is True
    tok = load_tokenizer(str(tmp_path))  # strict load: no training buffers in the export
    x = _batch()["image"]
    out = gen(x)
    assert torch.equal(tok.encode(x), out.codes)
    torch.testing.assert_close(tok.reconstruct(x), out.recon)
    torch.testing.assert_close(tok.codebook, gen.tokenizer.quantizer.codebook)


def test_stage2_trains_only_a_new_decoder_and_exports_one_tokenizer(tmp_path):
    _stage1_export(tmp_path / "s1")
    torch.manual_seed(0)
    cfg = AliTokStage2Config(stage1_export=str(tmp_path / "s1"), lpips_net=LPIPSConfig(random_init=True), gan_start_step=0,
                             convnext=0.0)
    m = AliTokStage2(cfg, DataSpec(resolution=RES, num_classes=3))
    assert not m.tok_cfg.decoder_causal and m.tok_cfg.num_buffer_tokens == 4 and m.tok_cfg.num_prefix_tokens == 4
    specs = m.modules()
    assert set(specs) == {"gen", "disc"}
    dec = specs["gen"].module
    assert dec.buffer_tokens is not None and dec.prefix_head is None
    frozen = {id(p) for part in (m.encoder, m.quantizer) for p in part.parameters()}
    assert frozen and not frozen & {id(p) for s in specs.values() for p in s.module.parameters()}
    assert all(not p.requires_grad for part in (m.encoder, m.quantizer) for p in part.parameters())
    assert m.encoder.latent_tokens.shape[0] == m.tok_cfg.seq_len  # the latent queries belong to the frozen encoder
    before = {k: v.clone() for part in ("encoder", "quantizer") for k, v in getattr(m, part).state_dict().items()}
    mods = {n: s.module for n, s in specs.items()}
    opts = {n: torch.optim.AdamW(mm.parameters(), lr=1e-2) for n, mm in mods.items()}
    for step in range(3):
        carry = {}
        for phase in m.phases():
            out = m.step(phase, mods, _batch(seed=step), step, carry)
            assert all(torch.isfinite(v) for v in out.metrics.values())
            out.loss.backward()
            opts[phase].step()
            opts[phase].zero_grad()
            carry.update(out.aux)
    after = {k: v for part in ("encoder", "quantizer") for k, v in getattr(m, part).state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before), "stage 2 changed a frozen stage-1 weight"
    assert all(p.grad is None for part in (m.encoder, m.quantizer) for p in part.parameters())
    state_ids = {id(p) for o in opts.values() for p in o.state}
    assert state_ids and not frozen & state_ids, "no optimiser state for the frozen parts"
    # the export: encoder + codebook of stage 1, the new decoder, as one tokenizer1d part
    A.save_export(str(tmp_path / "s2"), m.artifacts(mods))
    tok1, tok2 = load_tokenizer(str(tmp_path / "s1")), load_tokenizer(str(tmp_path / "s2"))
    x = _batch(seed=5)["image"]
    assert torch.equal(tok2.encode(x), tok1.encode(x)) and torch.equal(tok2.codebook, tok1.codebook)
    mods["gen"].eval()
    torch.testing.assert_close(tok2.reconstruct(x), mods["gen"](m.encode(x).quantized).image)
    assert tok2.decode(tok2.encode(x)).shape == x.shape and tok2.num_tokens(RES) == m.tok_cfg.seq_len
    rows = m.sample_images(mods, _batch(2), seed=0)
    assert rows["reconstruction"].shape == (2, 3, RES, RES)


def test_stage2_decoder_overrides_and_paper_buffers(tmp_path):
    _stage1_export(tmp_path, steps=0)
    cfg = AliTokStage2Config(stage1_export=str(tmp_path), lpips=0.0, convnext=0.0, decoder_overrides={"num_buffer_tokens": 8, "dec_depth": 1})
    m = AliTokStage2(cfg, DataSpec(resolution=RES, num_classes=3))
    dec = m.modules()["gen"].module
    assert dec.buffer_tokens.shape[0] == 8 and len(dec.vit.blocks) == 1


def test_bidirectional_stage1_is_the_ablation_baseline():
    """method.decoder_causal=false: stage 1 with a bidirectional decoder and no prefix (the paper's
    baseline (A)): every patch depends on every latent; its codes feed the same probe."""
    torch.manual_seed(0)
    m = _stage1(decoder_causal=False, aux=0.0, tokenizer_overrides={"num_prefix_tokens": 0}, probe="debug-tiny", gan=0.0)
    assert not m.tok_cfg.decoder_causal and m.tok_cfg.num_prefix_tokens == 0
    mods = _mods(m)
    out = m.step("gen", mods, _batch(), 1, {})
    assert not any(k.startswith("loss/aux") for k in out.metrics) and "prefix_psnr" not in out.metrics
    assert out.aux["codes"].shape == (4, 16)
    assert torch.isfinite(m.step("probe", mods, _batch(), 1, out.aux).loss)
    tok = mods["gen"].tokenizer
    zq = tok.quantizer(tok.encoder(_batch()["image"])[0]).quantized.detach().requires_grad_(True)
    tok.decode_full(zq).image[:, :, :8, :8].sum().backward()  # the first patch
    assert (zq.grad[0].abs().sum(-1) > 0).all()  # sees the last latent too
    with pytest.raises(ValueError, match="method.decoder_causal=false set method.aux=0"):
        _stage1(decoder_causal=False, tokenizer_overrides={"num_prefix_tokens": 0})


def test_validation_sums_add_up_over_batches():
    """`validate` sums of two half batches give the metrics of the whole batch (what the loop relies
    on when it adds them over batches and ranks)."""
    from system.methods.tokenizer_training import batch_psnr

    torch.manual_seed(0)
    m = _stage1(gan=0.0)
    mods = _mods(m)
    for mod in mods.values():
        mod.eval()
    x = _batch(6)
    halves = [m.validate(mods, {"image": x["image"][i:i + 3]}) for i in (0, 3)]
    totals = {k: halves[0][k] + halves[1][k] for k in halves[0]}
    whole = m.val_metrics(m.validate(mods, x))
    assert m.val_metrics(totals) == pytest.approx(whole)
    recon = mods["gen"](x["image"]).recon
    assert whole["psnr"] == pytest.approx(float(batch_psnr(recon, x["image"])), rel=1e-5)
    assert whole["images"] == 6 and float(totals["code_hist"].sum()) == 6 * (4 + 16)
    assert 0 < whole["codebook_usage"] <= 1


def test_config_errors_name_the_key(tmp_path):
    data = DataSpec(resolution=RES, num_classes=3)
    with pytest.raises(ValueError, match="num_prefix_tokens must be in"):
        _stage1(tokenizer_overrides={"num_prefix_tokens": 9})
    with pytest.raises(ValueError, match="quantizer.reinit_after_steps"):
        _stage1(tokenizer_overrides={"quantizer": {"cluster_decay": 0.0, "reinit_after_steps": 5}})
    with pytest.raises(ValueError, match="method.tokenizer="):
        _stage1(tokenizer="nope")
    with pytest.raises(ValueError, match="lpips_net.vgg_path"):
        AliTokStage1(AliTokStage1Config(tokenizer="debug-tiny-causal"), data)
    with pytest.raises(ValueError, match="method.convnext_net.path"):
        AliTokStage1(AliTokStage1Config(tokenizer="debug-tiny-causal", lpips=0.0, convnext=0.1), data)
    with pytest.raises(ValueError, match="method.stage1_export"):
        AliTokStage2.check(AliTokStage2Config(stage1_export=str(tmp_path / "none"), lpips=0.0, convnext=0.0), data)
    _stage1_export(tmp_path / "s1", steps=0)
    with pytest.raises(ValueError, match="data.resolution=64"):
        AliTokStage2.check(AliTokStage2Config(stage1_export=str(tmp_path / "s1"), lpips=0.0, convnext=0.0), dataclasses.replace(data, resolution=64))
    with pytest.raises(ValueError, match="method.decoder_overrides.enc_width"):
        AliTokStage2.check(AliTokStage2Config(stage1_export=str(tmp_path / "s1"), lpips=0.0, convnext=0.0,
                                              decoder_overrides={"enc_width": 32}), data)
    with pytest.raises(ValueError, match="method.stage1_part"):
        AliTokStage2.check(AliTokStage2Config(stage1_export=str(tmp_path / "s1"), stage1_part="ar", lpips=0.0, convnext=0.0), data)


@pytest.mark.gpu
def test_cuda_bf16_stage1_step_with_probe():
    torch.manual_seed(0)
    m = _stage1(lpips=0.0, gan_start_step=0, probe="debug-tiny").to(torch.device("cuda"))
    mods = {n: mod.cuda() for n, mod in _mods(m).items()}
    b = {k: v.cuda() for k, v in _batch().items()}
    carry = {}
    for phase in m.phases():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m.step(phase, mods, b, 0, carry)
        assert torch.isfinite(out.loss), phase
        out.loss.backward()
        carry.update(out.aux)
    q = mods["gen"].tokenizer.quantizer
    assert q.code_offset.dtype == torch.float32 and q.code_offset.abs().sum() > 0


# --------------------------------------------------------------------------- the official recipe (issue 22)
def test_stage1_loss_defaults_are_the_official_values():
    """AliTok's train_tokenizer/ (config.py, loss/mse_lpips_gan.py, README_AliTok.md): MSE weight 1 on
    [0, 1] images, ConvNeXt-S perceptual 1 (0.1 while LPIPS is on), LPIPS 1 for ~50k steps only,
    GAN 0.1 x 0.05, no LeCam; the same for stage 2."""
    from system.methods.alitok import perceptual_weights

    for cfg in (AliTokStage1Config(), AliTokStage2Config()):
        assert (cfg.l2, cfg.lpips, cfg.lpips_until_step, cfg.convnext, cfg.convnext_with_lpips) == (1.0, 1.0, 50000, 1.0, 0.1)
        assert cfg.gan == pytest.approx(0.1 * 0.05) and cfg.lecam == 0.0
        assert perceptual_weights(cfg, 0) == (1.0, 0.1) and perceptual_weights(cfg, 49999) == (1.0, 0.1)
        assert perceptual_weights(cfg, 50000) == (0.0, 1.0) and perceptual_weights(cfg, 600000) == (0.0, 1.0)
    assert AliTokStage1Config().aux == 10.0
    off = AliTokStage1Config(convnext=0.0, lpips_until_step=None)
    assert perceptual_weights(off, 10**6) == (1.0, 0.0)  # convnext=0 switches the term off in every phase


def test_paper_configs_carry_the_official_schedule():
    """configs/experiments/alitok_stage{1,2}.yaml: LPIPS off after 50k, the GAN (0.005, no LeCam) in
    the last 100k steps of the paper's 600k / 300k."""
    from system.config import AliTokStage1Experiment, AliTokStage2Experiment, load_config

    for schema, name, steps, gan_at in ((AliTokStage1Experiment, "alitok_stage1.yaml", 600000, 500000),
                                        (AliTokStage2Experiment, "alitok_stage2.yaml", 300000, 200000)):
        exp = load_config(schema, [], ["base.yaml", "data/imagenet.yaml", f"experiments/{name}"])
        m = exp.method
        assert exp.train.max_steps == steps and m.gan_start_step == gan_at and m.gan == pytest.approx(0.005)
        assert (m.l2, m.lpips, m.lpips_until_step, m.convnext, m.convnext_with_lpips, m.lecam) == (1.0, 1.0, 50000, 1.0, 0.1, 0.0)
    exp = load_config(AliTokStage1Experiment, [], ["base.yaml", "data/imagenet.yaml", "experiments/alitok_stage1.yaml"])
    assert exp.method.tokenizer == "alitok-tok-code" and exp.optim.lr == 1e-4 and exp.data.batch_size == 48


def test_lpips_switches_off_and_the_gan_starts_on_schedule():
    """The terms of a generator step before / after `lpips_until_step` and `gan_start_step`; the l2
    term is the MSE of [0, 1] images (1/4 of the MSE of our [-1, 1] images)."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM"):
        m = _stage1(convnext=1.0, convnext_net=ConvNeXtNetConfig(random_init=True, size="debug"), lpips_until_step=10,
                    gan=0.005, gan_start_step=20)
    mods = _mods(m)
    x = _batch()
    early, mid, late = (m.step("gen", mods, x, s, {}) for s in (9, 10, 20))
    terms = lambda o: {k.split("/", 1)[1] for k in o.metrics if k.startswith("loss/")}  # noqa: E731
    assert {"lpips", "aux_lpips", "convnext", "aux_convnext"} <= terms(early)
    assert {"lpips", "aux_lpips"}.isdisjoint(terms(mid)) and {"convnext", "aux_convnext"} <= terms(mid)
    assert float(early.metrics["loss/gan_g"]) == 0.0 and float(mid.metrics["loss/gan_g"]) == 0.0
    assert float(late.metrics["loss/gan_g"]) != 0.0  # the generator's hinge term from gan_start_step
    assert m.build_discriminator().cfg.lecam_weight == 0.0 and m.build_discriminator().cfg.weight == 0.005
    gen = mods["gen"].eval()
    recon = gen(x["image"]).recon
    got = m.reconstruction_terms(recon, x["image"], 10)
    torch.testing.assert_close(got["l2"], torch.nn.functional.mse_loss((recon + 1) / 2, (x["image"] + 1) / 2))
    # the ConvNeXt weight: 0.1 while LPIPS is on, 1.0 after
    c_early = m.reconstruction_terms(recon, x["image"], 0)["convnext"]
    torch.testing.assert_close(got["convnext"], c_early * 10)


def test_official_decoder_layout_is_the_paper_preset():
    """The presets' stage-1 decoder is the official plain causal transformer over [class token; 17
    prefix; 256 latents] (274 tokens, latent i -> patch i); ours (mask tokens) is an option."""
    from system.models.tokenizer1d import Tokenizer1D, tokenizer_config

    for name, prefix, buffers, reads in (("alitok-tok-code", 17, 32, True), ("alitok-tok-paper", 16, 64, False)):
        c = tokenizer_config(name)
        assert (c.decoder_layout, c.decoder_causal, c.num_prefix_tokens, c.proj_bias) == ("latents", True, prefix, True)
        with torch.device("meta"):
            dec = Tokenizer1D(c).decoder
        assert dec.attn_mask.shape == (1 + prefix + 256,) * 2 and dec.mask_token is None and dec.buffer_tokens.shape[0] == 1
        s2 = dataclasses.replace(c, decoder_causal=False)  # stage 2: the preset's source (code / paper)
        assert (s2.num_buffer_tokens, s2.unread_prefix) == (buffers, 0 if reads else prefix)
    ours = dataclasses.replace(tokenizer_config("alitok-tok-code"), decoder_layout="mask_tokens")
    with torch.device("meta"):
        assert Tokenizer1D(ours).decoder.attn_mask.shape == (17 + 256 + 256,) * 2


def test_official_layout_stage1_trains_with_the_aux_loss():
    """debug-tiny-alitok (the official layout, 1 + 4 prefix tokens): every term finite, the aux loss
    reaches only the prefix path, patch i sees only the prefix and latents <= i."""
    torch.manual_seed(0)
    m = _stage1(tokenizer="debug-tiny-alitok", gan_start_step=0)
    mods = _mods(m)
    out = m.step("gen", mods, _batch(), 1, {})
    assert {"loss/l2", "loss/aux_l2", "loss/aux_lpips", "loss/gan_g"} <= set(out.metrics)
    assert all(torch.isfinite(v) for v in out.metrics.values())
    dec = mods["gen"].tokenizer.decoder.eval()
    c = m.tok_cfg
    zq = torch.randn(1, c.seq_len, c.latent_dim, requires_grad=True)
    o = dec(zq)
    p, P = c.patch_size, c.num_prefix_tokens
    for i in (0, 5, 15):
        r, col = divmod(i, c.grid)
        (g,) = torch.autograd.grad(o.image[..., r * p:(r + 1) * p, col * p:(col + 1) * p].sum(), zq, retain_graph=True)
        per = g[0].abs().sum(-1)
        assert per[:P + i + 1].gt(0).all() and per[P + i + 1:].eq(0).all(), i
    (g,) = torch.autograd.grad(o.prefix_row.sum(), zq)
    assert g[0, P:].eq(0).all()
    assert o.image.abs().max() <= 1  # the official sigmoid head, as 2 s - 1


def test_alitok_pipeline_config_agrees_on_the_prefix_count():
    """configs/experiments/alitok_xl.yaml: stage 1's tokenizer, the AR model and so the sampler use
    one prefix count (17, the released code's); its sampling is XL's official CFG (13.0 / 1.4); the AR
    recipe is the official one (no EMA, no weight decay on the embeddings)."""
    from system.models.registry import gpt_config
    from system.models.tokenizer1d import tokenizer_config
    from system.pipelines.alitok import ALITOK

    cfg = ALITOK.load([])  # configs/experiments/alitok_xl.yaml over each section's job defaults
    tok = tokenizer_config(cfg.stage1.method.tokenizer)
    ar = gpt_config(cfg.ar.method.model, **cfg.ar.method.overrides)
    assert tok.num_prefix_tokens == ar.prefix_tokens == 17 and tok.seq_len - ar.prefix_tokens == ar.block_size == 256
    assert (cfg.sample.cfg_scale, cfg.sample.cfg_schedule, cfg.sample.cfg_power) == (13.0, "power-cosine", 1.4)
    assert cfg.ar.method.ema_decay == 0.0 and cfg.ar.method.decay_embeddings is False
