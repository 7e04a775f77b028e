"""SemTok's tokenizer training (../shared/seeds/semtok.txt; ../shared/REFERENCE.md "SemTok"), and the
small VAE the CPU demo needs in place of SD3.5's.

`semtok_stage1` (module "gen" = `Stage1Model`: MMDiT encoder + BSQ + MMDiT decoder + the projections
w_x, w_z of the semantic terms; the VAE and SigLIP are frozen helpers of the method):
    latents x = VAE(image) (no grad); tokens q = BSQ(E(x)); t ~ U[0, 1], eps ~ N(0, I)
    loss = ||x - eps - D(t eps + (1 - t) x, q, t)||^2                       (flow matching, Eq. 5)
         + quant x (E[H(q(z))] - H(E[q(z)]))       the batch mean over every rank (Eq. 4)
         + semantic x (distill x ||x_sig - w_x(E_2D)||^2 + contrastive x InfoNCE(w_z(q), x_sig))
           the InfoNCE negatives are the teacher features of every rank's batch (Eq. 2)
`semtok_stage2` (module "gen" = `FlowDecoder` in refiner mode: decoder + `MaskLatents`, plus "disc"
when gan > 0): encoder and BSQ loaded from the stage I export and frozen (method helpers: the
tokens, and so the AR's data, stay stage I's); decoder initialised from stage I, mask latents from
0; latents = m + D(m, q, 1) -> frozen VAE decoder -> l2 MSE + lpips LPIPS + resnet ResNet-logit
MSE + gan PatchGAN hinge (Eq. 7).
`latent_vae` (module "gen" = `TrainableVAE`): fits a small SD3.5-shaped AutoencoderKL (f = 8, 16
channels) by MSE + KL, tracking its latents' mean / std for the exported shift / scaling factors.
Only for where SD3.5's VAE cannot be had (no downloads here); the paper uses the pretrained one.

Stage II's discriminator is our PatchGAN (system/losses/gan.py: hinge, GroupNorm; the one every
tokenizer method here trains against), not the paper's: "we adopt the same discriminator as that in
(Weber et al., 2024)" (semtok.txt B.1), MaskBit's (in 1d-tokenizer / AliTok's code
`NLayerDiscriminator`: a 5x5 stem and 3 stages of 3x3 convolutions with blur down-sampling,
GroupNorm and LeakyReLU 0.1, 128 -> 1024 channels, logits max-pooled to 16 x 16). Why ours: SemTok
publishes no code, so MaskBit's settings at SemTok's scale would be a guess too, and the GAN is a
late, small term (weight 0.1 from 20k of 100k stage-II iterations, after MSE and perceptual). A
faithful run swaps the discriminator class in `build_discriminator`; not done here.
The paper's decoder starts from SD3.5 (`decoder_init`): the paper presets refuse to start without
it, `decoder_init=random` trains it from random weights on purpose and says so in the run's log.

Both SemTok stages export one part "tokenizer" of kind "semtok" (VAE + encoder + decoder; flow mode
after stage I, refiner mode after stage II) that `load_tokenizer` rebuilds for pre-tokenization,
sampling and evaluation.

Cross-rank terms: the entropy term's batch mean is all-reduced (`global_mean`) and the InfoNCE
negatives all-gathered, so a run on W ranks optimises the loss of its global batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from system.config import (
    ConfigError, LatentVAEConfig, LatentVAETrainConfig, SemTokStage1Config, SemTokStage2Config, override_dataclass)
from system.losses.align import AlignConfig, ContrastiveConfig, SemanticContrastiveLoss, SemanticDistillLoss
from system.methods.base import Collective, DataSpec, Method, ModuleSpec, StepOutput
from system.methods.registry import register
from system.methods.tokenizer_training import (
    PatchGANPhases, ReconstructionReport, batch_psnr, check_lpips_weights, code_histogram, usage_and_perplexity)
from system.models import weights
from system.models.artifacts import Artifact, load_part, model_part
from system.models.semtok import (
    EncodeOutput, FlowDecoder, SemTokConfig, SemTokEncoder, bit_usage, flow_matching_loss, resolve_semtok_config,
    semtok_config, semtok_config_from_dict, semtok_part_config)

# the paper's tokenizer presets: their decoder has SD3.5-Medium's shape and the paper initialises it from SD3.5
PAPER_PRESETS = ("semtok-18", "semtok-32")
HIST_BITS = 20  # validation code histograms fold codes to their low 20 bits (exact for up to 20-bit codebooks)


def global_mean(local: Tensor, collective: Collective) -> Tensor:
    """The mean of `local` over ranks (equal batches per rank) whose gradient reaches this rank's own
    `local` with weight 1: data-parallel training averages the ranks' gradients, so a term every
    rank computes from this value gets the gradient of the global-batch term."""
    if collective.world_size == 1:
        return local
    mean = collective.all_reduce(local.detach()) / collective.world_size
    return local + (mean - local.detach())


def build_vae(cfg: LatentVAEConfig, storage: Any = None) -> nn.Module:
    """The frozen VAE: from a latent_vae export (`cfg.export`) or `cfg.path` / `hub_name` / `random_init`."""
    from system.models.vae import build_latent_vae

    try:
        return build_latent_vae(cfg, storage)
    except (ValueError, FileNotFoundError, KeyError, OSError) as e:
        raise ConfigError(f"config key 'method.vae': {e}") from None


def check_vae(cfg: LatentVAEConfig) -> None:
    given = [k for k in ("export", "path", "hub_name") if getattr(cfg, k)] + (["random_init"] if cfg.random_init else [])
    if not given:
        weights.unset("SD3.5 VAE", "method.vae.path or hub_name", "method.vae: set exactly one of export (a latent_vae "
                      "run's export), path (a local SD3.5 folder), hub_name or random_init=true (tests); got none",
                      ConfigError)
    elif len(given) != 1:
        raise ConfigError("method.vae: set exactly one of export (a latent_vae run's export), path (a local SD3.5 "
                          "folder), hub_name or random_init=true (tests); got " + (", ".join(given) or "none"))


# --------------------------------------------------------------------------- the SemTok config of a stage
def stage1_semtok_config(cfg: SemTokStage1Config, resolution: int, latent_channels: int, downsample: int) -> SemTokConfig:
    """The preset + overrides at the data's resolution, sized for the VAE; ConfigError naming the key."""
    try:
        base = semtok_config(cfg.tokenizer)
    except KeyError as e:
        raise ConfigError(f"config key 'method.tokenizer' = {cfg.tokenizer!r}: {e.args[0]}") from None
    try:
        sc = override_dataclass(base, dict(cfg.tokenizer_overrides), "method.tokenizer_overrides")
        sc = dataclasses.replace(sc, image_size=resolution, latent_channels=latent_channels, downsample=downsample,
                                 bsq_inv_temperature=cfg.bsq_inv_temperature, decode_mode="flow",
                                 sample_steps=cfg.sample_steps)
        sc = resolve_semtok_config(sc)
        sc = dataclasses.replace(sc, encoder=dataclasses.replace(sc.encoder, grad_checkpointing=cfg.grad_checkpointing),
                                 decoder=dataclasses.replace(sc.decoder, grad_checkpointing=cfg.grad_checkpointing))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"method.tokenizer={cfg.tokenizer!r} / method.tokenizer_overrides / data.resolution="
                          f"{resolution}: {e}") from None
    return sc


# --------------------------------------------------------------------------- stage I
class Stage1Forward(NamedTuple):  # a NamedTuple so ZeRO-3's backward hooks see its tensors
    diff: Tensor  # flow-matching loss
    quant_losses: dict[str, Tensor]
    distill: Optional[Tensor]
    contrastive: Optional[Tensor]
    contrastive_acc: Optional[Tensor]
    codes: Tensor  # (B, K)


class Stage1Model(nn.Module):
    """Stage I's trained module: encoder + BSQ + flow decoder + semantic projections w_x, w_z."""

    def __init__(self, cfg: SemTokConfig, quant: float, commit: float, teacher_dim: int = 0, proj_hidden: int = 2048,
                 contrastive_temperature: float = 0.07, distill: bool = True, contrastive: bool = True,
                 entropy_group: int = 1):
        super().__init__()
        self.cfg = cfg
        self.encoder = SemTokEncoder(cfg, cfg.quantizer_config(quant, commit, entropy_group))
        self.decoder = FlowDecoder(cfg)
        w = cfg.encoder.width
        self.distill = SemanticDistillLoss(AlignConfig(w, teacher_dim, proj_hidden, depth=2)) if teacher_dim and distill else None
        self.contrastive = SemanticContrastiveLoss(ContrastiveConfig(
            cfg.bits, teacher_dim, proj_hidden, depth=2, temperature=contrastive_temperature)) if teacher_dim and contrastive else None

    def forward(self, latents: Tensor, teacher: Optional[Tensor] = None,
                collective: Optional[Collective] = None) -> Stage1Forward:
        col = collective or Collective()
        enc: EncodeOutput = self.encoder(latents, batch_mean=lambda m: global_mean(m, col))
        q = enc.quant.quantized
        diff = flow_matching_loss(self.decoder, latents, q)
        distill = con = acc = None
        if teacher is not None and self.distill is not None:
            side = int(teacher.shape[1] ** 0.5)
            distill = self.distill(enc.image, teacher, grid=enc.grid, teacher_grid=(side, side))
        if teacher is not None and self.contrastive is not None:
            gather = col.all_gather if col.world_size > 1 else None
            con, acc = self.contrastive(q, teacher, gather=gather, rank=col.rank)
        return Stage1Forward(diff, enc.quant.losses, distill, con, acc, enc.quant.codes)


class SemTokStage(ReconstructionReport):
    """What both SemTok stages share: the frozen VAE, cached latents, validation, the export."""

    sc: SemTokConfig  # set by the stage before this __init__
    vae: nn.Module

    def check_cached_latents(self) -> None:
        """ConfigError unless cached latents (data.url a latent shard set) come from this stage's VAE."""
        meta = self.data.latents
        if meta is None:
            return
        if meta.resolution != self.data.resolution:
            raise ConfigError(f"config key 'data.resolution' = {self.data.resolution}: the latent shard set at data.url "
                              f"was made at {meta.resolution} px")
        if weights.planning_now():
            return  # plan mode: no weights, no fingerprint (the dry run's wiring compares the VAE configs)
        mine = self.vae.fingerprint()
        if meta.vae.get("fingerprint") != mine:
            raise ConfigError(f"config key 'data.url': its cached latents come from another VAE ({meta.vae.get('source')}, "
                              f"fingerprint {meta.vae.get('fingerprint')}) than this stage's ({mine}): "
                              "re-cache them with this VAE or point data.url at the image shards")

    def frozen_parts(self) -> list[nn.Module]:
        return [self.vae]

    @torch.no_grad()
    def latents(self, x: Tensor) -> Tensor:
        return self.vae.encode(x).to(x.dtype)

    def batch_latents(self, batch: dict) -> Tensor:
        """The batch's VAE latents: cached ones (data.url a latent shard set, cluster/latent_pool.py)
        or the VAE's encoding of its images."""
        x = batch["image"]
        return batch["latents"].to(x.dtype) if "latents" in batch else self.latents(x)

    def decode_tokens(self, mods: dict[str, nn.Module], quantized: Tensor, seed: int = 0) -> Tensor:
        """Quantized tokens -> images with the stage's decoder (seeded noise in flow mode)."""
        raise NotImplementedError

    def encode(self, mods: dict[str, nn.Module], x: Tensor) -> EncodeOutput:
        raise NotImplementedError

    @torch.no_grad()
    def validate(self, mods: dict[str, nn.Module], batch: dict) -> dict[str, Tensor]:
        """PSNR of the reconstructions, per-bit counts of 1s, a code histogram (codes folded to their
        low HIST_BITS bits)."""
        x = batch["image"]
        quant = self.encode(mods, x).quant
        recon = self.decode_tokens(mods, quant.quantized)
        from system.eval.recon_metrics import psnr
        from system.models.quantizers import codes_to_bits

        p = psnr(recon.float().clamp(-1, 1), x.float(), data_range=2.0).clamp_max(100.0)
        fold = min(self.sc.bits, HIST_BITS)
        folded = quant.codes.reshape(-1) & ((1 << fold) - 1)
        hist = code_histogram(folded, 1 << fold)
        return {"count": x.new_tensor(float(len(x))), "psnr_sum": p.sum(), "tokens": x.new_tensor(float(folded.numel())),
                "bit_ones": codes_to_bits(quant.codes.reshape(-1), self.sc.bits).float().sum(0), "code_hist": hist}

    def val_metrics(self, totals: dict[str, Tensor]) -> dict[str, float]:
        """PSNR (dB), bit usage (fraction of bits whose mean is in [0.1, 0.9]), code perplexity and the
        fraction of the codebook seen (over the folded histogram: exact up to HIST_BITS bits)."""
        usage, ppl = usage_and_perplexity(totals["code_hist"])
        means = totals["bit_ones"] / totals["tokens"].clamp_min(1)
        return {"psnr": float(totals["psnr_sum"] / totals["count"].clamp_min(1)), "images": float(totals["count"]),
                "bit_usage": float(bit_usage(means)),
                "codebook_usage": float(usage), "codebook_perplexity": float(ppl)}

    @torch.no_grad()
    def sample_images(self, mods: dict[str, nn.Module], batch: dict, seed: int) -> dict[str, Tensor]:
        x = batch["image"]
        quant = self.encode(mods, x).quant
        return {"original": x, "vae only": self.vae.decode(self.latents(x)).float().clamp(-1, 1),
                "reconstruction": self.decode_tokens(mods, quant.quantized, seed).float().clamp(-1, 1)}

    def export_part(self, encoder: nn.Module, decoder: nn.Module, sc: SemTokConfig) -> dict[str, Artifact]:
        sd = {**{f"vae.{k}": v for k, v in self.vae.state_dict().items()},
              **{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
              **{f"decoder.{k}": v for k, v in decoder.state_dict().items()}}
        return {"tokenizer": Artifact("semtok", semtok_part_config(sc, self.vae.config_dict()), sd)}


def check_stage1(cfg: SemTokStage1Config, data: DataSpec) -> None:
    check_vae(cfg.vae)
    if cfg.teacher is not None and cfg.teacher.kind != "siglip":
        raise ConfigError(f"config key 'method.teacher.kind' = {cfg.teacher.kind!r}: SemTok aligns to SigLIP")
    if cfg.semantic > 0 and cfg.teacher is None:
        raise ConfigError("method.semantic > 0 needs method.teacher (SigLIP); set method.semantic=0 to train without it")
    t = cfg.teacher
    if cfg.semantic > 0 and not (t.path or t.hub_name or t.random_init):
        weights.unset("siglip teacher", "method.teacher.path or hub_name",
                      "method.teacher (SigLIP) has no weights: set method.teacher.path (a local SigLIP folder), "
                      "hub_name (needs internet) or random_init=true (tests), or method.semantic=0", ConfigError)
    stage1_semtok_config(cfg, data.resolution, 16, 8)  # the preset's own rules (sizes), before any VAE is built
    if cfg.decoder_init is None and cfg.tokenizer in PAPER_PRESETS:  # a config error (plan mode: listed as unset)
        weights.unset("SD3.5 transformer (decoder init)", "method.decoder_init",
                      f"config key 'method.decoder_init' is not set: method.tokenizer={cfg.tokenizer} has the paper's "
                      "SD3.5-Medium-shaped decoder (2.2B), which the paper initialises from SD3.5; give a local "
                      "SD3.5-Medium folder (method.decoder_init=/models/sd3.5-medium, its transformer/ is read), or "
                      "method.decoder_init=random to train it from random weights on purpose", ConfigError)


class SemTokStage1(SemTokStage):
    """SemTok stage I (module doc)."""

    report_keys = ("step", "loss", "loss/diff", "bit_usage", "images_per_s")

    def __init__(self, cfg: SemTokStage1Config, data: DataSpec):
        super().__init__(cfg, data)
        check_stage1(cfg, data)
        self.vae = build_vae(cfg.vae, data.storage)
        self.check_cached_latents()
        self.sc = stage1_semtok_config(cfg, data.resolution, self.vae.latent_channels, self.vae.downsample)
        from system.losses.teachers import Teacher

        self.teacher = Teacher(cfg.teacher) if cfg.teacher is not None and cfg.semantic > 0 else None

    @classmethod
    def check(cls, cfg: SemTokStage1Config, data: DataSpec) -> None:
        check_stage1(cfg, data)

    def frozen_parts(self) -> list[nn.Module]:
        return [self.vae] + ([self.teacher] if self.teacher is not None else [])

    def modules(self) -> dict[str, ModuleSpec]:
        c = self.cfg
        model = Stage1Model(self.sc, c.quant, c.commit, self.teacher.dim if self.teacher is not None else 0,
                            c.proj_hidden, c.contrastive_temperature, distill=c.distill > 0, contrastive=c.contrastive > 0,
                            entropy_group=c.entropy_group)
        if c.decoder_init == "random" and self.collective.rank == 0:
            print(f"[semtok] method.decoder_init=random: the decoder ({self.sc.decoder.depth} blocks) starts from random "
                  "weights, not from SD3.5 as in the paper", flush=True)
        elif c.decoder_init and c.decoder_init != "random":
            model.decoder.mmdit.load_pretrained(c.decoder_init)
        return {"gen": ModuleSpec(model, ema_decay=c.ema_decay)}

    def phases(self) -> list[str]:
        return ["gen"]

    def curve_keys(self) -> list[str]:
        return ["loss", "loss/diff", "loss/quant_entropy", "loss/distill|loss/contrastive", "psnr", "bit_usage"]

    def step(self, phase: str, mods: dict[str, nn.Module], batch: dict, step: int, carry: dict) -> StepOutput:
        c, x = self.cfg, batch["image"]
        teacher = self.teacher(x) if self.teacher is not None else None
        out: Stage1Forward = mods["gen"](self.batch_latents(batch), teacher, self.collective)
        terms = {"diff": out.diff, **{f"quant_{k}": v for k, v in out.quant_losses.items() if k != "commit" or c.commit > 0}}
        if out.distill is not None:
            terms["distill"] = c.semantic * c.distill * out.distill
        if out.contrastive is not None:
            terms["contrastive"] = c.semantic * c.contrastive * out.contrastive
        loss = torch.stack([v.float() for v in terms.values()]).sum()
        with torch.no_grad():
            from system.models.quantizers import codes_to_bits

            ones = self.collective.all_reduce(codes_to_bits(out.codes.reshape(-1), self.sc.bits).float().mean(0))
            means = ones / self.collective.world_size
            metrics = {f"loss/{k}": v.detach() for k, v in terms.items()}
            metrics.update({"loss/total": loss.detach(), "bit_usage": bit_usage(means)})
            if out.contrastive_acc is not None:
                metrics["contrastive_acc"] = out.contrastive_acc
        return StepOutput(loss, metrics)

    def encode(self, mods: dict[str, nn.Module], x: Tensor) -> EncodeOutput:
        return mods["gen"].encoder(self.latents(x))

    def decode_tokens(self, mods: dict[str, nn.Module], quantized: Tensor, seed: int = 0) -> Tensor:
        g = torch.Generator(device=quantized.device).manual_seed(seed)
        return self.vae.decode(mods["gen"].decoder.sample(quantized, self.sc.sample_steps, g))

    def artifacts(self, mods: dict[str, nn.Module]) -> dict[str, Artifact]:
        m = mods["gen"]
        return self.export_part(m.encoder, m.decoder, self.sc)


# --------------------------------------------------------------------------- stage II
def stage1_part(cfg: SemTokStage2Config, storage: Any) -> tuple[SemTokConfig, dict]:
    """(stage I SemTokConfig, its VAE config) from the stage I export's model.json; ConfigError naming the key."""
    try:
        entry = model_part(cfg.stage1_export, cfg.stage1_part, storage)
    except KeyError as e:
        raise ConfigError(f"config key 'method.stage1_part' = {cfg.stage1_part!r}: {e.args[0]}") from None
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ConfigError(f"config key 'method.stage1_export' = {cfg.stage1_export!r}: {e} (run stage 1 first: "
                          "jobs/semtok.py steps=[stage1])") from None
    if entry["kind"] != "semtok":
        raise ConfigError(f"config key 'method.stage1_part': part {cfg.stage1_part!r} of {cfg.stage1_export} is a "
                          f"{entry['kind']!r}; SemTok stage II needs a 'semtok' part (a semtok_stage1 export)")
    return semtok_config_from_dict(entry["config"])


def check_stage2(cfg: SemTokStage2Config, data: DataSpec) -> tuple[SemTokConfig, dict]:
    sc, vae = stage1_part(cfg, data.storage)
    if sc.image_size != data.resolution:
        raise ConfigError(f"config key 'data.resolution' = {data.resolution}: the stage I tokenizer at "
                          f"method.stage1_export works at {sc.image_size} px; set data.resolution={sc.image_size}")
    check_lpips_weights(cfg.lpips_net, cfg.lpips > 0, "method.lpips=0")
    if cfg.resnet > 0 and not (cfg.resnet_net.path or cfg.resnet_net.random_init):
        weights.unset("ResNet-50 perceptual", "method.resnet_net.path",
                      "the ResNet perceptual term needs weights: set method.resnet_net.path (a local "
                      "microsoft/resnet-50 folder), or method.resnet_net.random_init=true for a demo, or method.resnet=0",
                      ConfigError)
    return sc, vae


def full_precision(x: Tensor) -> torch.autocast:
    """Autocast off on x's device (frozen parts that must reproduce the fp32 codes)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _under(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


class SemTokStage2(PatchGANPhases, SemTokStage):
    """SemTok stage II (module doc)."""

    report_keys = ("step", "loss", "psnr", "images_per_s")

    @classmethod
    def compare_with(cls, cfg: SemTokStage2Config) -> dict[str, Optional[str]]:
        return {"stage1": cfg.stage1_export}

    def __init__(self, cfg: SemTokStage2Config, data: DataSpec):
        super().__init__(cfg, data)
        from system.models.vae import LatentVAE

        s1, vae_cfg = check_stage2(cfg, data)
        self.sc = dataclasses.replace(s1, decode_mode="refiner")
        self.sc = dataclasses.replace(self.sc, decoder=dataclasses.replace(s1.decoder, grad_checkpointing=cfg.grad_checkpointing))
        self.gan_image_size = s1.image_size
        # decoder: read in new_refiner; plan mode (system/models/weights.py): the architectures only
        sd = load_part(cfg.stage1_export, cfg.stage1_part, data.storage, ema=cfg.stage1_ema) \
            if weights.need("SemTok stage I export (VAE, encoder)", cfg.stage1_export) else None
        self.vae = LatentVAE.from_config_dict(vae_cfg, None if sd is None else _under(sd, "vae."))
        self.check_cached_latents()
        self.encoder = SemTokEncoder(s1)
        if sd is not None:
            self.encoder.load_state_dict(_under(sd, "encoder."))
        self.encoder.requires_grad_(False).eval()
        from system.losses.lpips import LPIPS
        from system.losses.resnet_perceptual import ResNetPerceptual

        self.lpips = LPIPS(cfg.lpips_net.vgg_path, cfg.lpips_net.lin_path) if cfg.lpips > 0 else None
        self.resnet = ResNetPerceptual(cfg.resnet_net.path, cfg.resnet_net.size) if cfg.resnet > 0 else None

    @classmethod
    def check(cls, cfg: SemTokStage2Config, data: DataSpec) -> None:
        check_stage2(cfg, data)

    def frozen_parts(self) -> list[nn.Module]:
        return [m for m in (self.vae, self.encoder, self.lpips, self.resnet) if m is not None]

    def new_refiner(self) -> FlowDecoder:
        """The stage II decoder: stage I's weights, mask latents 0 (the noise mean)."""
        dec = FlowDecoder(self.sc)
        c = self.cfg
        if not weights.need("SemTok stage I export (decoder)", c.stage1_export):
            return dec
        sd = _under(load_part(c.stage1_export, c.stage1_part, self.data.storage, ema=c.stage1_ema), "decoder.")
        missing, unexpected = dec.load_state_dict(sd, strict=False)
        if unexpected or missing != ["mask.latents"]:
            raise ValueError(f"stage I decoder does not fit the stage II one: missing {missing}, unexpected {unexpected}")
        return dec

    def modules(self) -> dict[str, ModuleSpec]:
        return self.gan_modules(ModuleSpec(self.new_refiner(), ema_decay=self.cfg.ema_decay))

    def curve_keys(self) -> list[str]:
        return ["loss", "loss/l2|loss/lpips|loss/resnet", "psnr", "disc_loss"]

    def encode(self, mods: dict[str, nn.Module], x: Tensor) -> EncodeOutput:
        with torch.no_grad(), full_precision(x):  # the codes pre-tokenization writes (fp32)
            return self.encoder(self.latents(x))

    def decode_tokens(self, mods: dict[str, nn.Module], quantized: Tensor, seed: int = 0) -> Tensor:
        return self.vae.decode(mods["gen"].refine(quantized))

    def generator_step(self, gen: nn.Module, disc: Optional[nn.Module], batch: dict, step: int) -> StepOutput:
        c, x = self.cfg, batch["image"]
        with torch.no_grad(), full_precision(x):  # the frozen encoder as pre-tokenization runs it: the AR's codes
            q = self.encoder(self.batch_latents(batch).float()).quant.quantized
        recon = self.vae.decode(gen.refine(q)).to(x.dtype)
        terms = {}
        if c.l2 > 0:
            terms["l2"] = c.l2 * F.mse_loss(recon.float(), x.float())
        if c.lpips > 0:
            terms["lpips"] = c.lpips * self.lpips(recon, x).mean()
        if c.resnet > 0:
            terms["resnet"] = c.resnet * self.resnet(recon, x)
        g = self.gan_generator_term(disc, recon, step)
        if g is not None:
            terms["gan_g"] = g
        loss = torch.stack([v.float() for v in terms.values()]).sum() if terms else recon.float().sum() * 0
        with torch.no_grad():
            metrics = {f"loss/{k}": v.detach() for k, v in terms.items()}
            metrics.update({"loss/total": loss.detach(), "psnr": batch_psnr(recon, x)})
        return StepOutput(loss, metrics, {"recon": recon.detach()})

    validate = SemTokStage.validate
    val_metrics = SemTokStage.val_metrics
    sample_images = SemTokStage.sample_images

    def artifacts(self, mods: dict[str, nn.Module]) -> dict[str, Artifact]:
        return self.export_part(self.encoder, mods["gen"], self.sc)


# --------------------------------------------------------------------------- the demo's VAE
class TrainableVAE(nn.Module):
    """A trainable AutoencoderKL plus EMAs of its latents' mean and mean square (the exported shift
    and scaling factors: latents enter SemTok about zero-mean, unit-variance, as SD3.5's factors do)."""

    def __init__(self, tiny: bool, stats_decay: float):
        super().__init__()
        from system.models.vae import new_autoencoder

        self.autoencoder = new_autoencoder(tiny=tiny)
        self.stats_decay = stats_decay
        self.register_buffer("latent_mean", torch.zeros(()))
        self.register_buffer("latent_sq", torch.ones(()))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W) -> (reconstruction, KL per sample mean)."""
        post = self.autoencoder.encode(x).latent_dist
        z = post.sample()
        if self.training:
            with torch.no_grad():
                d = self.stats_decay
                self.latent_mean.mul_(d).add_((1 - d) * z.float().mean())
                self.latent_sq.mul_(d).add_((1 - d) * z.float().pow(2).mean())
        recon = self.autoencoder.decode(z).sample
        return recon, post.kl().mean() / z[0].numel()

    def factors(self) -> tuple[float, float]:
        """(scaling, shift) so that (z - shift) * scaling has zero mean and unit variance."""
        if weights.planning_now():  # a dry run: no statistics yet (the export's config needs the keys only)
            return 1.0, 0.0
        mean = float(self.latent_mean)
        std = max(float(self.latent_sq) - mean**2, 1e-8) ** 0.5
        return 1.0 / std, mean


class LatentVAEMethod(ReconstructionReport):
    """`latent_vae` (module doc)."""

    report_keys = ("step", "loss", "psnr", "images_per_s")

    def modules(self) -> dict[str, ModuleSpec]:
        return {"gen": ModuleSpec(TrainableVAE(self.cfg.tiny, self.cfg.stats_decay), ema_decay=self.cfg.ema_decay)}

    def phases(self) -> list[str]:
        return ["gen"]

    def curve_keys(self) -> list[str]:
        return ["loss", "loss/l2", "psnr"]

    def step(self, phase: str, mods: dict[str, nn.Module], batch: dict, step: int, carry: dict) -> StepOutput:
        c, x = self.cfg, batch["image"]
        recon, kl = mods["gen"](x)
        terms = {}
        if c.l2 > 0:
            terms["l2"] = c.l2 * F.mse_loss(recon.float(), x.float())
        if c.l1 > 0:
            terms["l1"] = c.l1 * F.l1_loss(recon.float(), x.float())
        if c.kl > 0:
            terms["kl"] = c.kl * kl.float()
        loss = torch.stack(list(terms.values())).sum()
        return StepOutput(loss, {**{f"loss/{k}": v.detach() for k, v in terms.items()}, "psnr": batch_psnr(recon, x)})

    @torch.no_grad()
    def validate(self, mods: dict[str, nn.Module], batch: dict) -> dict[str, Tensor]:
        from system.eval.recon_metrics import psnr

        x = batch["image"]
        ae = mods["gen"].autoencoder
        recon = ae.decode(ae.encode(x).latent_dist.mode()).sample
        p = psnr(recon.float().clamp(-1, 1), x.float(), data_range=2.0).clamp_max(100.0)
        return {"count": x.new_tensor(float(len(x))), "psnr_sum": p.sum()}

    def val_metrics(self, totals: dict[str, Tensor]) -> dict[str, float]:
        return {"psnr": float(totals["psnr_sum"] / totals["count"].clamp_min(1)), "images": float(totals["count"])}

    @torch.no_grad()
    def sample_images(self, mods: dict[str, nn.Module], batch: dict, seed: int) -> dict[str, Tensor]:
        x = batch["image"]
        ae = mods["gen"].autoencoder
        return {"original": x, "reconstruction": ae.decode(ae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)}

    def artifacts(self, mods: dict[str, nn.Module]) -> dict[str, Artifact]:
        from system.models.vae import autoencoder_config_dict

        m = mods["gen"]
        return {"vae": Artifact("autoencoderkl", autoencoder_config_dict(m.autoencoder, *m.factors()),
                                dict(m.autoencoder.state_dict()))}


register("latent_vae", LatentVAETrainConfig, LatentVAEMethod)
register("semtok_stage1", SemTokStage1Config, SemTokStage1)
register("semtok_stage2", SemTokStage2Config, SemTokStage2)
