"""EOSTok: end-to-end training of a 1D tokenizer and an AR model (../shared/seeds/eostok.txt).

encoder -> 1D latents -> IBQ -> differentiable embedding h = Ind^T (codebook @ P | the AR's own
table E), Ind the straight-through one-hot -> AR with teacher forcing -> the decoder decodes
[z_q ; AR prediction] in one pass -> L_VQVAE (L1/L2 + LPIPS + GAN, quantizer regularisers) + NTP
+ APR + implicit alignment (+ REPA). Every weight is a config value and 0 switches a term off.

The paper's ablation rows as configs (keys of `method.`; defaults: l2 1, lpips 1, gan 0.1,
ntp 0.1, apr_l2 1, apr_lpips 1, align 0.5, align_target patches, repa 0):

| paper row                       | config                                                          |
|---------------------------------|-----------------------------------------------------------------|
| Two-stage baseline              | detach_ar_input=true apr_l2=0 apr_lpips=0 align=0 (*)           |
| Vanilla E2E (NTP only)          | apr_l2=0 apr_lpips=0 align=0                                    |
| + APR loss                      | align=0                                                         |
| + Decoder VFM alignment         | align=0 repa=0.5 (repa_layer: decoder block)                    |
| + Encoder direct alignment      | align_target=latents (1D latents z vs teacher patches, raster)  |
| + Direct substitution           | substitute_patches=true align=0                                 |
| + Implicit alignment (ours)     | defaults: align_target=patches, align_layer=null (middle block) |
| differentiable embedding        | model.ar_input=codebook (probs @ codebook @ P, rank 64) or      |
|                                 | model.ar_input=table (h = Ind^T E, the AR's own (K, dim) table) |

(*) detach_ar_input cuts the NTP gradient at the AR's input, Ind and the codebook alike, while
both are trained in one run; a true two-stage run trains the tokenizer first, then the AR on its
frozen codes. align_layer: the paper aligns an "intermediate" encoder block without naming it;
null takes the middle one (enc_depth // 2 - 1, 0-based; block 6 of 12), our assumption, and -1
the last (this module's earlier behaviour). With substitute_patches the encoder reads teacher
features instead of pixels, so an exported tokenizer cannot encode on its own (its patch
embedding is frozen and unused); its decoder and the AR model sample as usual.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from system.config import EOSTokConfig, ModelConfig, override_dataclass
from system.losses.align import AlignConfig, DecoderAlignLoss, DirectAlignLoss, ImplicitAlignLoss, infer_grid, match_grid
from system.losses.lpips import LPIPS
from system.losses.recon import ntp_loss
from system.losses.teachers import Teacher
from system.methods.base import DataSpec, ModuleSpec, StepOutput
from system.methods.registry import register
from system.models import weights
from system.models.artifacts import Artifact
from system.models.gpt import GPT, GPTConfig
from system.models.registry import gpt_config
from system.models.tokenizer1d import Tokenizer1D, Tokenizer1DConfig, tokenizer_config
from system.methods.tokenizer_training import (
    PatchGANPhases, batch_psnr, check_lpips_weights, code_histogram, usage_and_perplexity)


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


class TeacherPatchEmbed(nn.Module):
    """Direct substitution: teacher patch features (B, M, C_t) -> the encoder's patch embeddings
    (B, W, g, g) (a linear map to the encoder width, resized from the teacher's grid to g x g)."""

    def __init__(self, teacher_dim: int, width: int, grid: int):
        super().__init__()
        self.proj = nn.Linear(teacher_dim, width)
        self.grid = grid

    def forward(self, teacher: Tensor) -> Tensor:
        x = self.proj(teacher)  # (B, M, W)
        g = self.grid
        x = match_grid(x, infer_grid(x.shape[1], None, "teacher"), (g, g))  # (B, g*g, W)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], g, g)


@contextmanager
def replaced_patch_embeddings(encoder: nn.Module, patches: Tensor) -> Iterator[None]:
    """Inside, `encoder.patch_embed` returns `patches` (its own output's shape) instead of its
    output: the encoder's own path (positions, queries, ViT) runs on the substitute."""

    def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        if patches.shape != out.shape:
            raise ValueError(f"substitute patch embeddings {tuple(patches.shape)} != {tuple(out.shape)}")
        return patches.to(out.dtype)

    handle = encoder.patch_embed.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class EOSTokModel(nn.Module):
    """Everything the main engine optimises: tokenizer, AR model and the alignment projectors.

    The whole step runs inside `forward`, so ZeRO-3 gathers parameters for it; the codebook is
    also read outside the quantizer (`EOSTok.external_parameters`), which the engine registers.
    `align`: None (off), "patches" (implicit: encoder block `align_layer`) or "latents" (direct);
    `substitute`: teacher features replace the patch embeddings (the conv is frozen, unused)."""

    def __init__(self, tok_cfg: Tokenizer1DConfig, ar_cfg: GPTConfig, teacher_dim: int = 0, *,
                 align: Optional[str] = None, align_layer: int = -1, repa: bool = False, repa_layer: int = 1,
                 substitute: bool = False):
        super().__init__()
        self.tokenizer = Tokenizer1D(tok_cfg)
        self.ar = GPT(ar_cfg)
        self.align_target, self.align_layer, self.repa_layer = align, align_layer, repa_layer
        self.align = None
        if align == "patches":
            self.align = ImplicitAlignLoss(AlignConfig(tok_cfg.enc_width, teacher_dim, hidden_dim=4 * tok_cfg.enc_width))
        elif align == "latents":
            self.align = DirectAlignLoss(AlignConfig(tok_cfg.latent_dim, teacher_dim, hidden_dim=4 * tok_cfg.enc_width))
        elif align is not None:
            raise ValueError(f"align target {align!r}; expected None, 'patches' or 'latents'")
        self.repa = DecoderAlignLoss(AlignConfig(tok_cfg.dec_width, teacher_dim, hidden_dim=4 * tok_cfg.dec_width)) if repa else None
        self.substitute = TeacherPatchEmbed(teacher_dim, tok_cfg.enc_width, tok_cfg.grid) if substitute else None
        if substitute:
            self.tokenizer.encoder.patch_embed.requires_grad_(False)

    def encode(self, images: Tensor, teacher: Optional[Tensor] = None):
        """images -> (QuantizerOutput, encoder hidden patches after block `align_layer`); with
        direct substitution the teacher's projected features replace the patch embeddings."""
        if self.substitute is None:
            return self.tokenizer.encode(images, self.align_layer)
        if teacher is None:
            raise ValueError("direct substitution (substitute_patches) needs the teacher's features")
        with replaced_patch_embeddings(self.tokenizer.encoder, self.substitute(teacher)):
            return self.tokenizer.encode(images, self.align_layer)

    def forward(self, images: Tensor, labels: Tensor, teacher: Optional[Tensor] = None,
                detach_ar_input: bool = False) -> EOSTokForward:
        b = images.shape[0]
        quant, enc_hidden = self.encode(images, teacher)  # codes (B, L); enc_hidden (B, N, C)
        codebook = self.tokenizer.codebook  # (K, D)
        ind = quant.onehot if quant.onehot is not None else F.one_hot(quant.codes, codebook.shape[0]).to(codebook.dtype)
        ar_codebook = codebook if self.ar.code_proj is not None else None  # ar_input "table": the AR's own E
        if detach_ar_input:  # two-stage baseline: NTP gradients stop at the AR model, its input is data
            ind = ind.detach()
            ar_codebook = None if ar_codebook is None else ar_codebook.detach()
        logits = self.ar(probs=ind, labels=labels, codebook=ar_codebook)  # (B, L, K)
        z_hat = straight_through_onehot(logits).to(codebook.dtype) @ codebook  # (B, L, D) AR prediction
        dec = self.tokenizer.decode_full(torch.cat([quant.quantized, z_hat.to(quant.quantized.dtype)]),
                                         hidden_layer=self.repa_layer if self.repa is not None else None)
        align = None
        if self.align is not None and teacher is not None:
            align = self.align(enc_hidden if self.align_target == "patches" else quant.latents, teacher)
        repa = self.repa(dec.hidden[:b], teacher) if self.repa is not None and teacher is not None else None
        return EOSTokForward(dec.image[:b], dec.image[b:], quant.codes, logits, quant.losses, align, repa)


def build_configs(model: ModelConfig, resolution: int, num_classes: int) -> tuple[Tokenizer1DConfig, GPTConfig]:
    """Registry presets + overrides, with the fields that must agree derived from one place."""
    tok = override_dataclass(tokenizer_config(model.tokenizer), model.tokenizer_overrides, "method.model.tokenizer_overrides")
    tok = dataclasses.replace(tok, image_size=resolution, attn_backend=model.attn_backend,
                              grad_checkpointing=model.grad_checkpointing)
    if "code_dim" in model.ar_overrides:
        raise ValueError("method.model.ar_overrides.code_dim: set method.model.ar_input (codebook | table) instead")
    ar = override_dataclass(gpt_config(model.ar), model.ar_overrides, "method.model.ar_overrides")
    code_dim = tok.latent_dim if model.ar_input == "codebook" else None  # "table": the AR's own (K, dim) table
    ar = dataclasses.replace(
        ar, vocab_size=tok.quantizer.num_codes, block_size=tok.seq_len, code_dim=code_dim,
        num_classes=num_classes, attn_backend=model.attn_backend, grad_checkpointing=model.grad_checkpointing,
    )
    return tok, ar


def needs_teacher(cfg: EOSTokConfig) -> bool:
    return cfg.align > 0 or cfg.repa > 0 or cfg.substitute_patches


def align_layer(cfg: EOSTokConfig, tok: Tokenizer1DConfig) -> int:
    """The encoder block (0-based, -1 = last) whose hidden patch states the implicit alignment
    reads: method.align_layer, or the middle block when it is null."""
    layer = max(tok.enc_depth // 2 - 1, 0) if cfg.align_layer is None else cfg.align_layer
    if not -tok.enc_depth <= layer < tok.enc_depth:
        raise ValueError(f"method.align_layer={layer} is out of range for an encoder of depth {tok.enc_depth} "
                         f"(use 0..{tok.enc_depth - 1}, -1 for the last block, or null for the middle one)")
    return layer


def check_config(cfg: EOSTokConfig, data: DataSpec) -> None:
    """Everything that can be wrong with an EOSTok config, found without building a network
    (the job calls it before any Ray worker starts)."""
    try:
        tok, _ = build_configs(cfg.model, data.resolution, data.num_classes)
    except (ValueError, KeyError) as e:
        raise ValueError(f"method.model / data.resolution={data.resolution}: {e}") from None
    align_layer(cfg, tok)
    if needs_teacher(cfg):
        t = cfg.teacher
        if t.random_init and (t.path or t.hub_name):
            raise ValueError("method.teacher: random_init=true conflicts with path/hub_name; set one of them "
                             "(e.g. method.teacher.hub_name=null for a random-weight demo)")
        if not (t.random_init or t.path or t.hub_name):
            weights.unset(f"{t.kind} teacher", "method.teacher.path or hub_name",
                          "method.teacher needs method.teacher.path or hub_name (or random_init=true for a demo), "
                          "or switch alignment off with method.align=0 method.repa=0 method.substitute_patches=false")
    check_lpips_weights(cfg.lpips_net, cfg.lpips > 0 or cfg.apr_lpips > 0, "method.lpips=0 method.apr_lpips=0")


class EOSTok(PatchGANPhases):
    """The EOSTok method: modules "gen" (tokenizer + AR + alignment heads, with an EMA) and
    "disc" (PatchGAN with LeCam, when method.gan > 0), phases gen then disc."""

    report_keys = ("step", "loss", "psnr", "codebook_usage", "ar_acc", "images_per_s")

    def __init__(self, cfg: EOSTokConfig, data: DataSpec):
        check_config(cfg, data)
        super().__init__(cfg, data)
        self.tok_cfg, self.ar_cfg = build_configs(cfg.model, data.resolution, data.num_classes)
        self.gan_image_size = self.tok_cfg.image_size
        self.teacher = Teacher(cfg.teacher) if needs_teacher(cfg) else None
        self.lpips = LPIPS(cfg.lpips_net.vgg_path, cfg.lpips_net.lin_path) if cfg.lpips > 0 or cfg.apr_lpips > 0 else None

    @classmethod
    def check(cls, cfg: EOSTokConfig, data: DataSpec) -> None:
        check_config(cfg, data)

    def frozen_parts(self) -> list[nn.Module]:
        return [m for m in (self.teacher, self.lpips) if m is not None]

    # ------------------------------------------------------------------ modules
    def build_generator(self) -> EOSTokModel:
        c = self.cfg
        dim = self.teacher.dim if self.teacher is not None else 0
        return EOSTokModel(self.tok_cfg, self.ar_cfg, dim, align=c.align_target if c.align > 0 else None,
                           align_layer=align_layer(c, self.tok_cfg), repa=c.repa > 0, repa_layer=c.repa_layer,
                           substitute=c.substitute_patches)

    def modules(self) -> dict[str, ModuleSpec]:
        return self.gan_modules(ModuleSpec(self.build_generator(), ema_decay=self.cfg.ema_decay))

    def curve_keys(self) -> list[str]:
        return ["loss", "loss/l2|loss/apr_l2", "psnr|apr_psnr", "codebook_usage", "ar_acc", "disc_loss"]

    def external_parameters(self, name: str, module: nn.Module) -> list[nn.Parameter]:
        cb = module.tokenizer.quantizer.codebook if name == "gen" else None
        return [cb] if isinstance(cb, nn.Parameter) else []

    # -------------------------------------------------------------------- steps
    def _lpips(self, a: Tensor, b: Tensor) -> Tensor:
        return self.lpips(a, b).mean()

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
        g = self.gan_generator_term(disc, out.recon, step)
        if g is not None:
            terms["gan_g"] = g  # already weighted by cfg.gan (0 before gan_start_step)
        loss = torch.stack([v.float() for v in terms.values()]).sum()
        with torch.no_grad():  # tensors: the loop syncs them to the host only when it logs
            counts = self.collective.all_reduce(code_histogram(out.codes, self.tok_cfg.quantizer.num_codes))
            usage, ppl = usage_and_perplexity(counts)  # over the global batch of this step
            metrics = {f"loss/{k}": v.detach() for k, v in terms.items()}
            metrics.update({
                "loss/total": loss.detach(), "ntp_ce": ntp.detach(), "ar_acc": acc,
                "psnr": batch_psnr(out.recon, x), "apr_psnr": batch_psnr(out.apr, x),
                "codebook_usage": usage, "codebook_perplexity": ppl,
            })
        return StepOutput(loss, metrics, {"recon": out.recon.detach()})

    # --------------------------------------------------------------- outputs
    def reconstruct(self, mods: dict[str, nn.Module], x: Tensor) -> tuple[Tensor, Tensor, int]:
        gen = mods["gen"]
        quant, _ = gen.encode(x, self.teacher(x) if gen.substitute is not None else None)
        return gen.tokenizer.decode(quant.quantized), quant.codes, self.tok_cfg.quantizer.num_codes

    @torch.no_grad()
    def sample_images(self, mods: dict[str, nn.Module], batch: dict, seed: int) -> dict[str, Tensor]:
        from system.sampling.ar import generate

        gen = mods["gen"]
        x, y = batch["image"], batch["label"]
        recon = self.reconstruct(mods, x)[0]
        codebook = gen.tokenizer.codebook if gen.ar.code_proj is not None else None  # the table training read
        codes = generate(gen.ar, y, cfg_scale=self.cfg.sample_cfg_scale, temperature=self.cfg.sample_temperature,
                         seed=seed, codebook=codebook)
        samples = gen.tokenizer.decode_codes(codes)
        return {"original": x, "reconstruction": recon.clamp(-1, 1), "ar_sample": samples.clamp(-1, 1)}

    def artifacts(self, mods: dict[str, nn.Module]) -> dict[str, Artifact]:
        gen = mods["gen"]
        return {"tokenizer": Artifact("tokenizer1d", dataclasses.asdict(self.tok_cfg), gen.tokenizer.state_dict()),
                "ar": Artifact("gpt", dataclasses.asdict(self.ar_cfg), gen.ar.state_dict())}


register("eostok", EOSTokConfig, EOSTok)
