"""EOSTok: end-to-end training of a 1D tokenizer and an AR model (../shared/seeds/eostok.txt).

encoder -> 1D latents -> IBQ -> differentiable embedding (straight-through one-hot @ codebook)
-> AR with teacher forcing -> the decoder decodes [z_q ; AR prediction] in one pass ->
L_VQVAE (L1/L2 + LPIPS + GAN, quantizer regularisers) + NTP + APR + implicit alignment (+ REPA).
Every weight is a config value and 0 switches a term off, so the paper's ablation rows are configs.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from system.config import EOSTokConfig, ModelConfig, override_dataclass
from system.eval.recon_metrics import psnr
from system.losses.align import AlignConfig, DecoderAlignLoss, ImplicitAlignLoss
from system.losses.gan import DiscriminatorConfig, GANLoss, GANLossConfig
from system.losses.lpips import LPIPS
from system.losses.recon import ntp_loss
from system.losses.teachers import Teacher
from system.methods.base import DataSpec, Method, ModuleSpec, StepOutput, frozen
from system.methods.registry import register
from system.models.artifacts import Artifact
from system.models.gpt import GPT, GPTConfig
from system.models.registry import gpt_config
from system.models.tokenizer1d import Tokenizer1D, Tokenizer1DConfig, tokenizer_config


def straight_through_onehot(logits: Tensor) -> Tensor:
    """(..., K) logits -> onehot(argmax p) + p - sg(p): exact one-hot forward, soft gradients."""
    p = logits.float().softmax(-1)
    hard = F.one_hot(p.argmax(-1), p.shape[-1]).to(p.dtype)
    return hard + p - p.detach()


class EOSTokForward(NamedTuple):  # a NamedTuple so ZeRO-3's backward hooks see its tensors
    recon: Tensor  # (B, 3, H, W) decoded z_q
    apr: Tensor  # (B, 3, H, W) decoded AR prediction
    codes: Tensor  # (B, L)
    logits: Tensor  # (B, L, K) AR next-token logits (teacher forcing)
    quant_losses: dict[str, Tensor]
    align: Optional[Tensor]  # implicit alignment loss (scalar) or None
    repa: Optional[Tensor]  # decoder alignment loss (scalar) or None


class EOSTokModel(nn.Module):
    """Everything the main engine optimises: tokenizer, AR model and the alignment projectors.

    The whole step runs inside `forward`, so ZeRO-3 gathers parameters for it; the codebook is
    also read outside the quantizer (`EOSTok.external_parameters`), which the engine registers."""

    def __init__(self, tok_cfg: Tokenizer1DConfig, ar_cfg: GPTConfig, teacher_dim: int = 0, repa_layer: int = 1,
                 align: bool = False, repa: bool = False):
        super().__init__()
        self.tokenizer = Tokenizer1D(tok_cfg)
        self.ar = GPT(ar_cfg)
        self.repa_layer = repa_layer
        self.align = ImplicitAlignLoss(AlignConfig(tok_cfg.enc_width, teacher_dim, hidden_dim=4 * tok_cfg.enc_width)) if align else None
        self.repa = DecoderAlignLoss(AlignConfig(tok_cfg.dec_width, teacher_dim, hidden_dim=4 * tok_cfg.dec_width)) if repa else None

    def forward(self, images: Tensor, labels: Tensor, teacher: Optional[Tensor] = None,
                detach_ar_input: bool = False) -> EOSTokForward:
        b = images.shape[0]
        quant, enc_hidden = self.tokenizer.encode(images)  # codes (B, L); enc_hidden (B, N, C)
        codebook = self.tokenizer.codebook  # (K, D)
        ind = quant.onehot if quant.onehot is not None else F.one_hot(quant.codes, codebook.shape[0]).to(codebook.dtype)
        if detach_ar_input:  # two-stage baseline: NTP gradients stop at the AR model
            ind = ind.detach()
        logits = self.ar(probs=ind, labels=labels, codebook=codebook)  # (B, L, K)
        z_hat = straight_through_onehot(logits).to(codebook.dtype) @ codebook  # (B, L, D) AR prediction
        dec = self.tokenizer.decode_full(torch.cat([quant.quantized, z_hat.to(quant.quantized.dtype)]),
                                         hidden_layer=self.repa_layer if self.repa is not None else None)
        align = self.align(enc_hidden, teacher) if self.align is not None and teacher is not None else None
        repa = self.repa(dec.hidden[:b], teacher) if self.repa is not None and teacher is not None else None
        return EOSTokForward(dec.image[:b], dec.image[b:], quant.codes, logits, quant.losses, align, repa)


def build_configs(model: ModelConfig, resolution: int, num_classes: int) -> tuple[Tokenizer1DConfig, GPTConfig]:
    """Registry presets + overrides, with the fields that must agree derived from one place."""
    tok = override_dataclass(tokenizer_config(model.tokenizer), model.tokenizer_overrides, "method.model.tokenizer_overrides")
    tok = dataclasses.replace(tok, image_size=resolution, attn_backend=model.attn_backend,
                              grad_checkpointing=model.grad_checkpointing)
    ar = override_dataclass(gpt_config(model.ar), model.ar_overrides, "method.model.ar_overrides")
    ar = dataclasses.replace(
        ar, vocab_size=tok.quantizer.codebook_size, block_size=tok.seq_len, code_dim=tok.latent_dim,
        num_classes=num_classes, attn_backend=model.attn_backend, grad_checkpointing=model.grad_checkpointing,
    )
    return tok, ar


def check_config(cfg: EOSTokConfig, data: DataSpec) -> None:
    """Everything that can be wrong with an EOSTok config, found without building a network
    (the job calls it before any Ray worker starts)."""
    try:
        build_configs(cfg.model, data.resolution, data.num_classes)
    except (ValueError, KeyError) as e:
        raise ValueError(f"method.model / data.resolution={data.resolution}: {e}") from None
    if cfg.align > 0 or cfg.repa > 0:
        t = cfg.teacher
        if t.random_init and (t.path or t.hub_name):
            raise ValueError("method.teacher: random_init=true conflicts with path/hub_name; set one of them "
                             "(e.g. method.teacher.hub_name=null for a random-weight demo)")
        if not (t.random_init or t.path or t.hub_name):
            raise ValueError("method.teacher needs method.teacher.path or hub_name (or random_init=true for a demo), "
                             "or switch alignment off with method.align=0 method.repa=0")
    if (cfg.lpips > 0 or cfg.apr_lpips > 0) and not (cfg.lpips_net.vgg_path or cfg.lpips_net.random_init):
        raise ValueError("LPIPS needs weights: set method.lpips_net.vgg_path and lin_path "
                         "(or method.lpips_net.random_init=true for a demo), or method.lpips=0 method.apr_lpips=0")


def code_histogram(codes: Tensor, k: int) -> Tensor:
    """(K,) float counts of each code in `codes` (no host sync)."""
    return torch.zeros(k, device=codes.device).index_add_(0, codes.flatten(), torch.ones(codes.numel(), device=codes.device))


def usage_and_perplexity(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Fraction of codes used and exp(entropy) of the code distribution from (K,) counts."""
    p = counts / counts.sum().clamp_min(1)
    return (counts > 0).float().mean(), torch.exp(-(p * p.clamp_min(1e-30).log()).sum())


class EOSTok(Method):
    """The EOSTok method: modules "gen" (tokenizer + AR + alignment heads, with an EMA) and
    "disc" (PatchGAN with LeCam, when method.gan > 0), phases gen then disc."""

    def __init__(self, cfg: EOSTokConfig, data: DataSpec):
        check_config(cfg, data)
        super().__init__(cfg, data)
        self.tok_cfg, self.ar_cfg = build_configs(cfg.model, data.resolution, data.num_classes)
        self.teacher = Teacher(cfg.teacher) if cfg.align > 0 or cfg.repa > 0 else None
        self.lpips = LPIPS(cfg.lpips_net.vgg_path, cfg.lpips_net.lin_path) if cfg.lpips > 0 or cfg.apr_lpips > 0 else None

    @classmethod
    def check(cls, cfg: EOSTokConfig, data: DataSpec) -> None:
        check_config(cfg, data)

    def to(self, device: torch.device) -> "EOSTok":
        for m in (self.teacher, self.lpips):
            if m is not None:
                m.to(device)
        return self

    # ------------------------------------------------------------------ modules
    def build_generator(self) -> EOSTokModel:
        dim = self.teacher.dim if self.teacher is not None else 0
        return EOSTokModel(self.tok_cfg, self.ar_cfg, dim, self.cfg.repa_layer, self.cfg.align > 0, self.cfg.repa > 0)

    def build_discriminator(self) -> Optional[GANLoss]:
        if self.cfg.gan <= 0:
            return None
        ch = 64 if self.tok_cfg.image_size >= 128 else 32
        disc = DiscriminatorConfig(ndf=ch, n_layers=3 if self.tok_cfg.image_size >= 64 else 2, num_groups=8)
        return GANLoss(GANLossConfig(disc=disc, weight=self.cfg.gan, lecam_weight=self.cfg.lecam,
                                     adaptive=self.cfg.adaptive_gan_weight, gan_start_step=self.cfg.gan_start_step))

    def modules(self) -> dict[str, ModuleSpec]:
        out = {"gen": ModuleSpec(self.build_generator(), ema_decay=self.cfg.ema_decay)}
        disc = self.build_discriminator()
        if disc is not None:
            out["disc"] = ModuleSpec(disc, lr=self.cfg.disc_lr, betas=tuple(self.cfg.disc_betas))
        return out

    def phases(self) -> list[str]:
        return ["gen", "disc"] if self.cfg.gan > 0 else ["gen"]

    def curve_keys(self) -> list[str]:
        return ["loss", "loss/l2|loss/apr_l2", "psnr|apr_psnr", "codebook_usage", "ar_acc", "disc_loss"]

    def external_parameters(self, name: str, module: nn.Module) -> list[nn.Parameter]:
        cb = module.tokenizer.quantizer.codebook if name == "gen" else None
        return [cb] if isinstance(cb, nn.Parameter) else []

    # -------------------------------------------------------------------- steps
    def _lpips(self, a: Tensor, b: Tensor) -> Tensor:
        return self.lpips(a, b).mean()

    def step(self, phase: str, mods: dict[str, nn.Module], batch: dict, step: int, carry: dict) -> StepOutput:
        if phase == "gen":
            return self.generator_step(mods["gen"], mods.get("disc"), batch, step)
        loss, m = mods["disc"].discriminator_loss(batch["image"], carry["recon"], step)
        return StepOutput(loss, {k: v.detach() for k, v in m.items()})

    def generator_step(self, gen: nn.Module, disc: Optional[nn.Module], batch: dict, step: int) -> StepOutput:
        c = self.cfg
        x, y = batch["image"], batch["label"]
        teacher = self.teacher(x) if self.teacher is not None else None
        out: EOSTokForward = gen(x, y, teacher, c.detach_ar_input)
        terms: dict[str, Tensor] = {}
        if c.l1 > 0:
            terms["l1"] = c.l1 * (out.recon - x).abs().mean()
        if c.l2 > 0:
            terms["l2"] = c.l2 * F.mse_loss(out.recon, x)
        if c.lpips > 0:
            terms["lpips"] = c.lpips * self._lpips(out.recon, x)
        for k, v in out.quant_losses.items():
            terms[f"quant_{k}"] = v
        ntp, acc = ntp_loss(out.logits, out.codes, label_smoothing=c.ntp_label_smoothing)
        if c.ntp > 0:
            terms["ntp"] = c.ntp * ntp
        if c.apr_l2 > 0:
            terms["apr_l2"] = c.apr_l2 * F.mse_loss(out.apr, x)
        if c.apr_lpips > 0:
            terms["apr_lpips"] = c.apr_lpips * self._lpips(out.apr, x)
        if out.align is not None:
            terms["align"] = c.align * out.align
        if out.repa is not None:
            terms["repa"] = c.repa * out.repa
        if disc is not None:
            with frozen(disc):
                g, _ = disc.generator_loss(out.recon, step)
            terms["gan_g"] = g  # already weighted by cfg.gan (0 before gan_start_step)
        loss = torch.stack([v.float() for v in terms.values()]).sum()
        with torch.no_grad():  # tensors: the loop syncs them to the host only when it logs
            counts = self.collective.all_reduce(code_histogram(out.codes, self.tok_cfg.quantizer.codebook_size))
            usage, ppl = usage_and_perplexity(counts)  # over the global batch of this step
            metrics = {f"loss/{k}": v.detach() for k, v in terms.items()}
            metrics.update({
                "loss/total": loss.detach(), "ntp_ce": ntp.detach(), "ar_acc": acc,
                "psnr": batch_psnr(out.recon, x), "apr_psnr": batch_psnr(out.apr, x),
                "codebook_usage": usage, "codebook_perplexity": ppl,
            })
        return StepOutput(loss, metrics, {"recon": out.recon.detach()})

    # --------------------------------------------------------------- outputs
    @torch.no_grad()
    def sample_images(self, mods: dict[str, nn.Module], batch: dict, seed: int) -> dict[str, Tensor]:
        from system.sampling.ar import generate

        gen = mods["gen"]
        x, y = batch["image"], batch["label"]
        recon = gen.tokenizer(x).image
        codes = generate(gen.ar, y, cfg_scale=self.cfg.sample_cfg_scale, temperature=self.cfg.sample_temperature,
                         seed=seed, codebook=gen.tokenizer.codebook)
        samples = gen.tokenizer.decode_codes(codes)
        return {"original": x, "reconstruction": recon.clamp(-1, 1), "ar_sample": samples.clamp(-1, 1)}

    def artifacts(self, mods: dict[str, nn.Module]) -> dict[str, Artifact]:
        gen = mods["gen"]
        return {"tokenizer": Artifact("tokenizer1d", dataclasses.asdict(self.tok_cfg), gen.tokenizer.state_dict()),
                "ar": Artifact("gpt", dataclasses.asdict(self.ar_cfg), gen.ar.state_dict())}


register("eostok", EOSTokConfig, EOSTok)


def batch_psnr(recon: Tensor, real: Tensor) -> Tensor:
    """Mean per-image PSNR in dB of images in [-1, 1] (the evaluation's definition, on the
    [-1, 1] scale: data_range 2), reconstructions clamped to the valid range first."""
    return psnr(recon.detach().float().clamp(-1, 1), real.float(), data_range=2.0).mean()


def val_psnr_report(cfg, export_url: str) -> dict[str, float]:
    """Validation reconstruction PSNR (dB) of the exported tokenizer (raw and EMA weights) next to
    an untrained tokenizer of the same config: the demo's evidence that training did something.
    `cfg`: an EOSTokExperiment (its data section)."""
    from system.data.reader import ShardReader
    from system.eval.recon_metrics import mean_psnr
    from system.models.artifacts import load_tokenizer

    def val_batches():
        return ShardReader.from_config(cfg.data, rank=0, world_size=1, seed=cfg.seed, val=True).one_epoch()

    report = {}
    for name, ema in (("trained", False), ("trained_ema", True)):
        tok = load_tokenizer(export_url, cfg.data.storage, ema=ema)
        report[name] = mean_psnr(tok.reconstruct, val_batches())
    torch.manual_seed(cfg.seed)
    untrained = Tokenizer1D(tok.model.cfg).eval()
    report["untrained"] = mean_psnr(lambda x: untrained(x).image, val_batches())
    return report
