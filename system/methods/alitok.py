"""AliTok's two tokenizer stages (../shared/seeds/alitok.txt; ../shared/REFERENCE.md "AliTok"; the
official code, github.com/ali-vilab/alitok train_tokenizer/; docs/recipes.md has the table of every
value with its source).

Stage 1, method `alitok_stage1` (module "gen" = `AliTokStage1Model`, plus "disc" when gan > 0):
images -> bidirectional ViT encoder over [patches; prefix queries; latent queries] -> VQ (4096 x
32, commitment 0.25) -> causal decoder (patch i sees the prefix latents and latents <= i; the
prefix head decodes the prefix tokens to the first patch row) ->
    l2 MSE (images in [0, 1]) + ConvNeXt-S logits + LPIPS (early steps only) + quantizer terms
    + aux (prefix) + gan hinge (PatchGAN).
The presets' decoder is the official one (`decoder_layout="latents"`: a plain causal transformer
over [class token; prefix; latents], latent i's output is patch i, 274 tokens at 256 px with 17
prefix tokens); ours, one mask token per patch, is `tokenizer_overrides.decoder_layout=mask_tokens`.
`method.decoder_causal=false` (with aux 0 and no prefix tokens) is the paper's ablation baseline
(A): the same stage with a bidirectional decoder (bench/alitok_ablation.py).
The codebook follows the official clustering re-initialisation inside the training forward: the
step's global code counts (an all-reduce of each rank's histogram) and each code's nearest feature
over all ranks (an all-gather of each rank's nearest one) give every rank the same update
(`VectorQuantizer.cluster_update`, which moves the quantizer's `code_offset` buffer: DeepSpeed's
optimiser keeps its own copy of the weights and would undo an in-place edit of them).

The loss schedule is the official code's (train_tokenizer/README_AliTok.md, config.py,
loss/mse_lpips_gan.py): ① LPIPS 1.0 and ConvNeXt 0.1 for the first ~50k steps (`lpips_until_step`,
`convnext_with_lpips`), ② ConvNeXt 1.0 alone, ③ + the GAN (generator weight 0.1 x 0.05 = 0.005) in
the last ~100k steps (`gan_start_step`), no LeCam; MSE on [0, 1] images (1/4 of the MSE on our
[-1, 1] images). The official phases are separate runs with the lr lowered by hand (1e-4 -> 2e-5 ->
2e-6); here one run with a cosine schedule.

The aux loss reaches the prefix path only (prefix latents, decoder, prefix head; never the image
latents or the patch head): its MSE is the official one, over the patches the prefix tokens decode
(the first row, and with P > grid also the first P - grid patches of it: the code's 17 tokens
decode "first patch + first row"), times aux x P / N (official: x10 x 17/256, which is 10x the
weight the full-image MSE gives one row); its perceptual terms are the paper's (the official aux
loss is the MSE alone): the step's perceptual terms on the full image whose first row comes from
the prefix tokens and whose other rows are the reconstruction detached, times aux (10x what one row
gets from the full-image terms, the same ratio).

With `method.probe` (a GPT preset), stage 1 also trains a small AR model, module "probe", on the
step's codes (detached: it never shapes the tokenizer) and logs its next-token accuracy before its
update, `probe/acc`: the paper's "AR training accuracy" of the codes as they are now. It trains
every step: a phase the loop skipped on some steps would still move AdamW's weights.

Stage 2, method `alitok_stage2` (module "gen" = a new `Decoder1D`, plus "disc"): the stage-1
encoder, quantizer and latent queries, loaded from the stage-1 export, are frozen helpers of the
method (in no module, so in no optimiser and no checkpoint); a fresh bidirectional decoder with
buffer tokens learns to decode the frozen codes with the same losses. The preset picks the source:
alitok-tok-code as the code (32 buffer tokens, the prefix codes read), alitok-tok-paper as the paper
(64 buffer tokens, "prefix tokens are removed"). Its export is one tokenizer1d part (encoder +
codebook + new decoder) that `load_tokenizer` and jobs/pretokenize.py read; the AR model trains on
the stage-1 codes, which both exports share.

Where we still differ from the official code:
- GAN: our PatchGAN (system/losses/gan.py) where the code has MaskBit's discriminator (1d-tokenizer
  NLayerDiscriminator: blur resampling, GroupNorm, 16 x 16 max-pooled logits) fed [0, 1] images;
  its discriminator loss x0.1 (AdamW is nearly invariant to that scale); both phases step every step
  (the code alternates G and D steps once the GAN is on).
- AdamW's weight decay (0.01, the torch default the code uses) skips biases and norms here.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from system.config import AliTokLossConfig, AliTokStage1Config, AliTokStage2Config, override_dataclass
from system.losses.convnext_perceptual import ConvNeXtPerceptual
from system.losses.lpips import LPIPS
from system.losses.recon import ntp_loss
from system.methods.base import Collective, DataSpec, ModuleSpec, StepOutput
from system.methods.registry import register
from system.methods.tokenizer_training import (
    PatchGANPhases, batch_psnr, check_convnext_weights, check_lpips_weights, code_histogram, usage_and_perplexity)
from system.models import weights
from system.models.artifacts import Artifact, load_part, model_part
from system.models.gpt import GPT, GPTConfig
from system.models.quantizers import build_quantizer
from system.models.registry import gpt_config
from system.models.tokenizer1d import (
    Encoder1D, Tokenizer1D, Tokenizer1DConfig, new_decoder, tokenizer1d_config, tokenizer_config)

# Tokenizer1DConfig fields stage 2 may change: the decoder's alone (the encoder and codebook are stage 1's)
DECODER_FIELDS = ("dec_width", "dec_depth", "dec_heads", "num_buffer_tokens", "decoder_reads_prefix", "decoder_layout")


# --------------------------------------------------------------------------- the codebook over ranks
@torch.no_grad()
def sync_codebook(quantizer: nn.Module, codes: Tensor, features: Tensor, collective: Collective,
                  update: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """The step's global code counts (K,) and, when `update` and the quantizer clusters
    (cluster_decay > 0), its re-initialisation from every rank's features: each rank's nearest
    feature per code is all-gathered and every rank applies the same `cluster_update` (returns its
    factors a (K,), else None). Collective: call it on every rank."""
    counts = collective.all_reduce(code_histogram(codes, quantizer.cfg.codebook_size))
    if not (update and getattr(quantizer.cfg, "cluster_decay", 0.0) > 0):
        return counts, None
    dist, feat = quantizer.nearest_features(features)
    return counts, quantizer.cluster_update(counts, collective.all_gather(dist[None]),
                                            collective.all_gather(feat[None].contiguous()))


def mse01(a: Tensor, b: Tensor) -> Tensor:
    """The MSE of two images in [-1, 1] as the official code takes it, on [0, 1] images: 1/4 of ours."""
    return F.mse_loss(a, b) / 4


def perceptual_weights(cfg: AliTokLossConfig, step: int) -> tuple[float, float]:
    """(LPIPS, ConvNeXt) weights at `step`: LPIPS before `lpips_until_step` only, and ConvNeXt (off
    when `convnext` is 0) at `convnext_with_lpips` while LPIPS is on (the official phases ① and ②)."""
    lpips_on = cfg.lpips > 0 and (cfg.lpips_until_step is None or step < cfg.lpips_until_step)
    with_lpips = lpips_on and cfg.convnext_with_lpips is not None and cfg.convnext > 0
    return (cfg.lpips if lpips_on else 0.0), (cfg.convnext_with_lpips if with_lpips else cfg.convnext)


def prefix_composite(prefix_row: Tensor, recon: Tensor) -> Tensor:
    """The full image whose first patch row is the prefix tokens' and whose other rows are the
    reconstruction's, detached (the aux perceptual loss reaches the prefix path only)."""
    return torch.cat([prefix_row, recon[:, :, prefix_row.shape[2]:].detach()], dim=2)


# --------------------------------------------------------------------------- shared by both stages
class AliTokStage(PatchGANPhases):
    """The reconstruction objective and outputs both stages share (see module doc)."""

    tok_cfg: Tokenizer1DConfig  # set by the stage before this __init__

    def __init__(self, cfg, data: DataSpec):
        super().__init__(cfg, data)
        self.gan_image_size = self.tok_cfg.image_size
        self.lpips = LPIPS(cfg.lpips_net.vgg_path, cfg.lpips_net.lin_path) if cfg.lpips > 0 else None
        self.convnext = ConvNeXtPerceptual(cfg.convnext_net.path, cfg.convnext_net.size) if cfg.convnext > 0 else None

    def frozen_parts(self) -> list[nn.Module]:
        return [m for m in (self.lpips, self.convnext) if m is not None]

    def perceptual_terms(self, recon: Tensor, x: Tensor, step: int, scale: float = 1.0, prefix: str = "") -> dict[str, Tensor]:
        """The step's perceptual terms (`perceptual_weights`) x `scale`, named `<prefix>lpips` / `<prefix>convnext`."""
        w_lpips, w_convnext = perceptual_weights(self.cfg, step)
        terms = {}
        if w_lpips > 0:
            terms[f"{prefix}lpips"] = scale * w_lpips * self.lpips(recon, x).mean()
        if w_convnext > 0:
            terms[f"{prefix}convnext"] = scale * w_convnext * self.convnext(recon, x)
        return terms

    def reconstruction_terms(self, recon: Tensor, x: Tensor, step: int) -> dict[str, Tensor]:
        c, terms = self.cfg, {}
        if c.l2 > 0:
            terms["l2"] = c.l2 * mse01(recon, x)
        terms.update(self.perceptual_terms(recon, x, step))
        return terms

    def finish(self, terms: dict[str, Tensor], recon: Tensor, x: Tensor, disc: Optional[nn.Module], step: int,
               counts: Tensor, extra: dict[str, Tensor]) -> StepOutput:
        """Adds the GAN term, sums the loss; metrics: every term, PSNR, global codebook usage."""
        g = self.gan_generator_term(disc, recon, step)
        if g is not None:
            terms["gan_g"] = g  # weighted by cfg.gan; 0 before gan_start_step
        loss = torch.stack([v.float() for v in terms.values()]).sum() if terms else recon.new_zeros((), dtype=torch.float32)
        with torch.no_grad():
            usage, ppl = usage_and_perplexity(counts)  # over the global batch of this step
            metrics = {f"loss/{k}": v.detach() for k, v in terms.items()}
            metrics.update({"loss/total": loss.detach(), "psnr": batch_psnr(recon, x), "codebook_usage": usage,
                            "codebook_perplexity": ppl, **extra})
        return StepOutput(loss, metrics, {"recon": recon.detach()})

    def curve_keys(self) -> list[str]:
        return ["loss", "loss/l2|loss/aux_l2", "psnr", "codebook_usage", "disc_loss", "probe/acc"]


# --------------------------------------------------------------------------- stage 1
class Stage1Forward(NamedTuple):  # a NamedTuple so ZeRO-3's backward hooks see its tensors
    recon: Tensor  # (B, 3, H, W)
    prefix_row: Optional[Tensor]  # (B, 3, patch, W) the first row decoded from the prefix tokens
    prefix_lead: Optional[Tensor]  # (B, 3, patch, k * patch) the first k = P - grid patches (or None)
    codes: Tensor  # (B, P + L)
    quant_losses: dict[str, Tensor]
    counts: Optional[Tensor]  # (K,) global code counts of the step (with a collective)
    moved: Optional[Tensor]  # (K,) the clustering factors of the step (training with cluster_decay > 0)


class AliTokStage1Model(nn.Module):
    """Stage 1's trained module: the whole tokenizer. With a collective (training), the codebook
    is re-initialised inside the forward, where ZeRO-3 has the codebook gathered."""

    def __init__(self, cfg: Tokenizer1DConfig):
        super().__init__()
        self.tokenizer = Tokenizer1D(cfg)

    def forward(self, images: Tensor, collective: Optional[Collective] = None) -> Stage1Forward:
        tok = self.tokenizer
        z, _ = tok.encoder(images)
        quant = tok.quantizer(z)
        counts = moved = None
        if collective is not None:
            counts, moved = sync_codebook(tok.quantizer, quant.codes, z, collective, update=self.training)
        dec = tok.decode_full(quant.quantized)
        return Stage1Forward(dec.image, dec.prefix_row, dec.prefix_lead, quant.codes, quant.losses, counts, moved)


def stage1_tokenizer_config(cfg: AliTokStage1Config, resolution: int) -> Tokenizer1DConfig:
    """The preset + overrides at the data's resolution, with a causal decoder (`method.decoder_causal`)."""
    fixed = dict(image_size=resolution, decoder_causal=cfg.decoder_causal, attn_backend=cfg.attn_backend,
                 grad_checkpointing=cfg.grad_checkpointing)
    try:  # one replace: the preset's prefix count may only fit together with the overrides at this resolution
        return override_dataclass(tokenizer_config(cfg.tokenizer), {**cfg.tokenizer_overrides, **fixed},
                                  "method.tokenizer_overrides")
    except (ValueError, KeyError) as e:
        raise ValueError(f"method.tokenizer={cfg.tokenizer!r} / data.resolution={resolution}: {e}") from None


def probe_config(cfg: AliTokStage1Config, tok: Tokenizer1DConfig, num_classes: int) -> GPTConfig:
    """The probe AR model over the tokenizer's codes: AliTok's AR layout (prefix tokens, then the
    latents; mixed 1D/2D RoPE when the latents form a square grid, else 1D)."""
    grid = int(tok.num_latent_tokens**0.5)
    fixed = dict(vocab_size=tok.quantizer.codebook_size, prefix_tokens=tok.num_prefix_tokens,
                 block_size=tok.num_latent_tokens, num_classes=max(num_classes, 1),
                 rope="mixed" if grid * grid == tok.num_latent_tokens else "1d", attn_backend=cfg.attn_backend)
    try:
        return gpt_config(cfg.probe, **{**cfg.probe_overrides, **fixed})
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"method.probe={cfg.probe!r} / method.probe_overrides: {e}") from None


def check_stage1(cfg: AliTokStage1Config, data: DataSpec) -> Tokenizer1DConfig:
    """Everything that can be wrong with a stage-1 config, without building a network."""
    tok = stage1_tokenizer_config(cfg, data.resolution)
    q = tok.quantizer
    if q.type == "bsq":
        raise ValueError("method.tokenizer_overrides.quantizer.type=bsq: AliTok stage 1 trains a VQ (vq) codebook")
    if q.reinit_after_steps > 0:
        raise ValueError("method.tokenizer_overrides.quantizer.reinit_after_steps: the dead-code rule draws random "
                         "features per rank; AliTok uses the clustering rule (quantizer.cluster_decay=0.99, "
                         "reinit_after_steps=0), which every rank applies identically")
    p, g = tok.num_prefix_tokens, tok.grid
    if cfg.aux > 0 and not cfg.decoder_causal:
        raise ValueError("method.aux decodes the first patch row from the prefix tokens with the causal decoder; "
                         "with method.decoder_causal=false set method.aux=0")
    if cfg.aux > 0 and not g <= p <= 2 * g:
        raise ValueError(f"method.aux={cfg.aux} decodes the first patch row ({g} patches at data.resolution="
                         f"{data.resolution}) from the prefix tokens: num_prefix_tokens must be in [{g}, {2 * g}], got "
                         f"{p} (set method.tokenizer_overrides.num_prefix_tokens, or method.aux=0)")
    check_lpips_weights(cfg.lpips_net, cfg.lpips > 0, "method.lpips=0")
    check_convnext_weights(cfg.convnext_net, cfg.convnext > 0, "method.convnext=0")
    if cfg.probe is not None:
        probe_config(cfg, tok, data.num_classes)
    return tok


class AliTokStage1(AliTokStage):
    """AliTok stage 1: the tokenizer with a causal decoder (see module doc)."""

    report_keys = ("step", "loss", "psnr", "prefix_psnr", "codebook_usage", "probe/acc", "images_per_s")

    def __init__(self, cfg: AliTokStage1Config, data: DataSpec):
        self.tok_cfg = check_stage1(cfg, data)
        super().__init__(cfg, data)

    @classmethod
    def check(cls, cfg: AliTokStage1Config, data: DataSpec) -> None:
        check_stage1(cfg, data)

    def modules(self) -> dict[str, ModuleSpec]:
        out = self.gan_modules(ModuleSpec(AliTokStage1Model(self.tok_cfg), ema_decay=self.cfg.ema_decay))
        if self.cfg.probe is not None:
            out["probe"] = ModuleSpec(GPT(probe_config(self.cfg, self.tok_cfg, self.data.num_classes)), lr=self.cfg.probe_lr)
        return out

    def phases(self) -> list[str]:
        return super().phases() + (["probe"] if self.cfg.probe is not None else [])

    def step(self, phase: str, mods: dict[str, nn.Module], batch: dict, step: int, carry: dict) -> StepOutput:
        if phase != "probe":
            return super().step(phase, mods, batch, step, carry)
        # the probe: next-token prediction of this step's codes (detached), accuracy before its update
        codes = carry["codes"]
        loss, acc = ntp_loss(mods["probe"](codes, batch["label"]), codes)
        return StepOutput(loss, {"acc": acc})

    def external_parameters(self, name: str, module: nn.Module) -> list[nn.Parameter]:
        # the codebook is read outside the quantizer's forward (its re-initialisation)
        return [module.tokenizer.quantizer.embedding.weight] if name == "gen" else []

    def aux_terms(self, x: Tensor, out: Stage1Forward, step: int = 0) -> dict[str, Tensor]:
        """The prefix aux loss (module doc): official MSE of the prefix patches x aux x P / N and the
        step's perceptual terms of the prefix composite x aux."""
        c, t = self.cfg, self.tok_cfg
        if c.aux <= 0 or out.prefix_row is None:
            return {}
        p = t.patch_size
        pred, target = out.prefix_row, x[:, :, :p]
        if out.prefix_lead is not None:
            k = out.prefix_lead.shape[-1]
            pred, target = torch.cat([out.prefix_lead, pred], -1), torch.cat([x[:, :, :p, :k], target], -1)
        terms = {}
        if c.l2 > 0:
            terms["aux_l2"] = c.aux * t.num_prefix_tokens / t.num_patches * c.l2 * mse01(pred, target)
        terms.update(self.perceptual_terms(prefix_composite(out.prefix_row, out.recon), x, step, c.aux, "aux_"))
        return terms

    def generator_step(self, gen: nn.Module, disc: Optional[nn.Module], batch: dict, step: int) -> StepOutput:
        x = batch["image"]
        out: Stage1Forward = gen(x, self.collective)
        terms = self.reconstruction_terms(out.recon, x, step)
        terms.update({f"quant_{k}": v for k, v in out.quant_losses.items()})
        terms.update(self.aux_terms(x, out, step))
        extra = {}
        if out.moved is not None:  # codes pulled more than halfway to a feature this step
            extra["codebook_reinit"] = (out.moved > 0.5).float().sum()
        if out.prefix_row is not None:
            extra["prefix_psnr"] = batch_psnr(out.prefix_row, x[:, :, :self.tok_cfg.patch_size])
        result = self.finish(terms, out.recon, x, disc, step, out.counts, extra)
        result.aux["codes"] = out.codes.detach()
        return result

    def reconstruct(self, mods: dict[str, nn.Module], x: Tensor) -> tuple[Tensor, Tensor, int]:
        out = mods["gen"](x)  # no collective: no codebook change
        return out.recon, out.codes, self.tok_cfg.quantizer.codebook_size

    @torch.no_grad()
    def sample_images(self, mods: dict[str, nn.Module], batch: dict, seed: int) -> dict[str, Tensor]:
        x = batch["image"]
        out = mods["gen"](x)  # no collective: no codebook change
        rows = {"original": x, "reconstruction": out.recon.clamp(-1, 1)}
        if out.prefix_row is not None:
            rows["prefix_row"] = prefix_composite(out.prefix_row, out.recon).clamp(-1, 1)
        return rows

    def artifacts(self, mods: dict[str, nn.Module]) -> dict[str, Artifact]:
        cfg, sd = mods["gen"].tokenizer.inference_state()  # re-initialisation offsets folded into the codebook
        return {"tokenizer": Artifact("tokenizer1d", dataclasses.asdict(cfg), sd)}


# --------------------------------------------------------------------------- stage 2
def stage1_tokenizer(cfg: AliTokStage2Config, storage) -> Tokenizer1DConfig:
    """The stage-1 export's tokenizer config (model.json only); ValueError naming the key."""
    url = cfg.stage1_export
    try:
        entry = model_part(url, cfg.stage1_part, storage)
    except KeyError as e:
        raise ValueError(f"method.stage1_part = {cfg.stage1_part!r}: {e.args[0]}") from None
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ValueError(f"method.stage1_export = {url!r}: {e} (run stage 1 first: jobs/alitok.py stage=1)") from None
    if entry["kind"] != "tokenizer1d":
        raise ValueError(f"method.stage1_part = {cfg.stage1_part!r} of {url} is a {entry['kind']!r}; stage 2 needs a "
                         "tokenizer1d (an alitok_stage1 export)")
    try:
        return tokenizer1d_config(entry["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"method.stage1_export = {url!r}: {e}") from None


def stage2_tokenizer_config(cfg: AliTokStage2Config, stage1: Tokenizer1DConfig) -> Tokenizer1DConfig:
    """Stage 1's tokenizer with a bidirectional decoder (buffer tokens; the prefix codes read or not,
    as the preset says), a plain codebook (no re-initialisation) and `method.decoder_overrides`."""
    bad = sorted(set(cfg.decoder_overrides) - set(DECODER_FIELDS))
    if bad:
        raise ValueError(f"method.decoder_overrides.{bad[0]}: stage 2 keeps the stage-1 encoder and codebook; only "
                         f"decoder fields may change: {', '.join(DECODER_FIELDS)}")
    tok = dataclasses.replace(stage1, quantizer=stage1.quantizer.without_reinit(), decoder_causal=False,
                              attn_backend=cfg.attn_backend, grad_checkpointing=cfg.grad_checkpointing)
    return override_dataclass(tok, cfg.decoder_overrides, "method.decoder_overrides")


def check_stage2(cfg: AliTokStage2Config, data: DataSpec) -> tuple[Tokenizer1DConfig, Tokenizer1DConfig]:
    """Everything that can be wrong with a stage-2 config (reads the stage-1 model.json, no weights);
    returns the (stage-1, stage-2) tokenizer configs."""
    s1 = stage1_tokenizer(cfg, data.storage)
    if s1.image_size != data.resolution:
        raise ValueError(f"data.resolution={data.resolution}: the stage-1 tokenizer at method.stage1_export works at "
                         f"{s1.image_size} px; set data.resolution={s1.image_size}")
    check_lpips_weights(cfg.lpips_net, cfg.lpips > 0, "method.lpips=0")
    check_convnext_weights(cfg.convnext_net, cfg.convnext > 0, "method.convnext=0")
    return s1, stage2_tokenizer_config(cfg, s1)


class AliTokStage2(AliTokStage):
    """AliTok stage 2: a new bidirectional decoder on the frozen stage-1 encoder (see module doc)."""

    report_keys = ("step", "loss", "psnr", "codebook_usage", "images_per_s")

    @classmethod
    def compare_with(cls, cfg: AliTokStage2Config) -> dict[str, Optional[str]]:
        return {"stage1": cfg.stage1_export}

    def __init__(self, cfg: AliTokStage2Config, data: DataSpec):
        s1, self.tok_cfg = check_stage2(cfg, data)
        super().__init__(cfg, data)
        self.encoder = Encoder1D(self.tok_cfg)
        q = build_quantizer(s1.quantizer)
        if weights.need("AliTok stage-1 export (encoder, codebook)", cfg.stage1_export):  # plan mode: shapes only
            sd = load_part(cfg.stage1_export, cfg.stage1_part, data.storage, ema=cfg.stage1_ema)
            self.encoder.load_state_dict(_under(sd, "encoder."))
            q.load_state_dict(_under(sd, "quantizer."))
        if hasattr(q, "inference_state"):  # an export with re-initialisation buffers: fold them
            qcfg, qsd = q.inference_state()
            q = build_quantizer(qcfg)
            q.load_state_dict(qsd)
        self.quantizer = q
        for m in (self.encoder, self.quantizer):
            m.requires_grad_(False).eval()

    @classmethod
    def check(cls, cfg: AliTokStage2Config, data: DataSpec) -> None:
        check_stage2(cfg, data)

    def frozen_parts(self) -> list[nn.Module]:
        return [self.encoder, self.quantizer, *super().frozen_parts()]

    def modules(self) -> dict[str, ModuleSpec]:
        return self.gan_modules(ModuleSpec(new_decoder(self.tok_cfg), ema_decay=self.cfg.ema_decay))

    @torch.no_grad()
    def encode(self, x: Tensor):
        """images -> the frozen stage-1 QuantizerOutput (codes (B, P + L), quantized latents)."""
        z, _ = self.encoder(x)
        return self.quantizer(z)

    def generator_step(self, gen: nn.Module, disc: Optional[nn.Module], batch: dict, step: int) -> StepOutput:
        x = batch["image"]
        quant = self.encode(x)
        recon = gen(quant.quantized).image
        counts = self.collective.all_reduce(code_histogram(quant.codes, self.tok_cfg.quantizer.codebook_size))
        return self.finish(self.reconstruction_terms(recon, x, step), recon, x, disc, step, counts, {})

    def reconstruct(self, mods: dict[str, nn.Module], x: Tensor) -> tuple[Tensor, Tensor, int]:
        quant = self.encode(x)
        return mods["gen"](quant.quantized).image, quant.codes, self.tok_cfg.quantizer.codebook_size

    @torch.no_grad()
    def sample_images(self, mods: dict[str, nn.Module], batch: dict, seed: int) -> dict[str, Tensor]:
        x = batch["image"]
        return {"original": x, "reconstruction": self.reconstruct(mods, x)[0].clamp(-1, 1)}

    def artifacts(self, mods: dict[str, nn.Module]) -> dict[str, Artifact]:
        parts = {"encoder": self.encoder, "quantizer": self.quantizer, "decoder": mods["gen"]}
        sd = {f"{name}.{k}": v for name, m in parts.items() for k, v in m.state_dict().items()}
        return {"tokenizer": Artifact("tokenizer1d", dataclasses.asdict(self.tok_cfg), sd)}


def _under(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


register("alitok_stage1", AliTokStage1Config, AliTokStage1)
register("alitok_stage2", AliTokStage2Config, AliTokStage2)
