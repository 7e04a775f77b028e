"""Pieces shared by the methods that train image tokenizers by reconstruction (EOSTok, the AliTok
stages): the PatchGAN phase pair, code-usage metrics over all ranks, PSNR of a batch, and the
LPIPS and ConvNeXt weight checks.

`PatchGANPhases` gives a method a "gen" module and, when `cfg.gan > 0`, a "disc" module (PatchGAN
with hinge losses and LeCam, switched on at `cfg.gan_start_step`) with its own AdamW
(`cfg.disc_lr`, `cfg.disc_betas`); phases gen then disc; `step` calls the method's
`generator_step` or the shared discriminator step. The generator step adds
`gan_generator_term(disc, recon, step)` and puts the detached reconstruction in its aux as "recon",
which the disc phase reads. Config fields it reads: gan, lecam, gan_start_step, disc_lr,
disc_betas (adaptive_gan_weight when present).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from system.eval.recon_metrics import psnr
from system.losses.gan import DiscriminatorConfig, GANLoss, GANLossConfig
from system.methods.base import Method, ModuleSpec, RunReport, StepOutput, frozen
from system.models import weights


class ReconstructionReport(Method):
    """A method whose run reports reconstruction validation (`tokenizer_report`): PSNR untrained ->
    trained (EMA), next to the runs of the exports `compare_with` names."""

    @classmethod
    def compare_with(cls, cfg: Any) -> dict[str, Optional[str]]:
        """{label: export URL} of input runs whose final validation the report shows beside this one's."""
        return {}

    @classmethod
    def report(cls, cfg: Any, metrics: dict[str, Any], val: dict[str, float], export_url: Optional[str],
               val_of: Callable[[str], dict[str, float]]) -> RunReport:
        return tokenizer_report(cls.report_keys, metrics, val, cls.compare_with(cfg), val_of)


class PatchGANPhases(ReconstructionReport):
    """A Method whose generator "gen" may be trained against a PatchGAN "disc" (see module doc).
    Subclasses set `gan_image_size` (the side of the images the discriminator sees)."""

    gan_image_size: int = 256

    def build_discriminator(self) -> Optional[GANLoss]:
        """The PatchGAN with its losses, sized for the image (None when `cfg.gan` is 0)."""
        c = self.cfg
        if c.gan <= 0:
            return None
        size = self.gan_image_size
        disc = DiscriminatorConfig(ndf=64 if size >= 128 else 32, n_layers=3 if size >= 64 else 2, num_groups=8)
        return GANLoss(GANLossConfig(disc=disc, weight=c.gan, lecam_weight=c.lecam,
                                     adaptive=getattr(c, "adaptive_gan_weight", False), gan_start_step=c.gan_start_step))

    def gan_modules(self, gen: ModuleSpec) -> dict[str, ModuleSpec]:
        """{"gen": gen} plus the discriminator with its own optimiser settings when `cfg.gan > 0`."""
        out = {"gen": gen}
        disc = self.build_discriminator()
        if disc is not None:
            out["disc"] = ModuleSpec(disc, lr=self.cfg.disc_lr, betas=tuple(self.cfg.disc_betas))
        return out

    def phases(self) -> list[str]:
        return ["gen", "disc"] if self.cfg.gan > 0 else ["gen"]

    def step(self, phase: str, mods: dict[str, nn.Module], batch: dict, step: int, carry: dict) -> StepOutput:
        if phase == "gen":
            return self.generator_step(mods["gen"], mods.get("disc"), batch, step)
        return self.discriminator_step(mods, batch, step, carry)

    def generator_step(self, gen: nn.Module, disc: Optional[nn.Module], batch: dict, step: int) -> StepOutput:
        """The "gen" phase (`disc`: the frozen discriminator or None); its aux holds "recon"."""
        raise NotImplementedError

    def reconstruct(self, mods: dict[str, nn.Module], x: Tensor) -> tuple[Tensor, Tensor, int]:
        """Validation: (reconstruction of `x`, its codes, codebook size), no codebook change."""
        raise NotImplementedError

    @torch.no_grad()
    def validate(self, mods: dict[str, nn.Module], batch: dict) -> dict[str, Tensor]:
        x = batch["image"]
        recon, codes, k = self.reconstruct(mods, x)
        p = psnr(recon.detach().float().clamp(-1, 1), x.float(), data_range=2.0).clamp_max(100.0)
        return {"count": x.new_tensor(float(len(x))), "psnr_sum": p.sum(), "code_hist": code_histogram(codes, k)}

    def val_metrics(self, totals: dict[str, Tensor]) -> dict[str, float]:
        """Mean per-image PSNR (dB, [-1, 1] scale) and codebook usage/perplexity over the whole
        validation sample of every rank."""
        usage, ppl = usage_and_perplexity(totals["code_hist"])
        return {"psnr": float(totals["psnr_sum"] / totals["count"].clamp_min(1)), "images": float(totals["count"]),
                "codebook_usage": float(usage), "codebook_perplexity": float(ppl)}

    @staticmethod
    def gan_generator_term(disc: Optional[nn.Module], recon: Tensor, step: int) -> Optional[Tensor]:
        """The generator's hinge term against the frozen discriminator (weighted by `cfg.gan`; 0 before
        `cfg.gan_start_step`), or None without a discriminator."""
        if disc is None:
            return None
        with frozen(disc):
            g, _ = disc.generator_loss(recon, step)
        return g

    @staticmethod
    def discriminator_step(mods: dict[str, nn.Module], batch: dict, step: int, carry: dict) -> StepOutput:
        """The "disc" phase: hinge (+ LeCam) on the batch's real images and the generator's detached
        reconstructions of this step (`carry["recon"]`)."""
        loss, m = mods["disc"].discriminator_loss(batch["image"], carry["recon"], step)
        return StepOutput(loss, {k: v.detach() for k, v in m.items()})


def tokenizer_report(keys: tuple[str, ...], metrics: dict[str, Any], val: dict[str, float],
                     others: Optional[dict[str, Optional[str]]] = None,
                     val_of: Optional[Callable[[str], dict[str, float]]] = None) -> RunReport:
    """The report of a tokenizer run: the metrics `keys`, then the validation the workers ran (PSNR
    untrained -> trained (EMA), next to the final validation of the runs whose exports `others`
    names: {label: export URL}) and its codebook usage; `val_psnr_db` and `validation` in result.json."""
    rows = [(k, metrics[k]) for k in keys if k in metrics]
    summary: dict[str, Any] = {}
    if "val/psnr" in val:
        summary["validation"] = val
        psnr = {"untrained": val.get("val_start/psnr"), "trained": val["val/psnr"], "trained_ema": val.get("val_ema/psnr")}
        for name, url in (others or {}).items():  # another run's export: that run's own final validation
            if url and val_of is not None:
                theirs = val_of(url.rstrip("/").rsplit("/", 1)[0])
                psnr[name] = theirs.get("val_ema/psnr", theirs.get("val/psnr"))
        summary["val_psnr_db"] = psnr = {k: v for k, v in psnr.items() if v is not None}
        summary.update({f"val_psnr_{k}": v for k, v in psnr.items()})  # flat, for a pipeline's step table
        fmt = lambda k: f"{psnr[k]:.2f}" if k in psnr else "-"  # noqa: E731
        rows.append(("val PSNR (dB)", f"untrained {fmt('untrained')} -> trained {fmt('trained')} (EMA "
                                      f"{fmt('trained_ema')})" + "".join(f"; {k} {fmt(k)}" for k in others or {})))
        if "val/codebook_usage" in val:  # a tokenizer with codes (not a VAE)
            rows.append(("val codebook usage", f"{val['val/codebook_usage']:.3f} of the codes over "
                                               f"{val.get('val/images', 0):.0f} images (perplexity "
                                               f"{val.get('val/codebook_perplexity', 0):.1f})"))
    return RunReport(rows, summary)


def code_histogram(codes: Tensor, k: int) -> Tensor:
    """(K,) float counts of each code in `codes` (no host sync)."""
    return torch.zeros(k, device=codes.device).index_add_(0, codes.flatten(), torch.ones(codes.numel(), device=codes.device))


def usage_and_perplexity(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Fraction of codes used and exp(entropy) of the code distribution from (K,) counts."""
    p = counts / counts.sum().clamp_min(1)
    return (counts > 0).float().mean(), torch.exp(-(p * p.clamp_min(1e-30).log()).sum())


def batch_psnr(recon: Tensor, real: Tensor) -> Tensor:
    """Mean per-image PSNR in dB of images in [-1, 1] (the evaluation's definition, on the
    [-1, 1] scale: data_range 2), reconstructions clamped to the valid range first."""
    return psnr(recon.detach().float().clamp(-1, 1), real.float(), data_range=2.0).mean()


def check_lpips_weights(lpips_net: Any, used: bool, switch_off: str) -> None:
    """ValueError unless an LPIPS that is used has weights (or is a declared random-weight demo);
    `switch_off`: the settings that turn every LPIPS term off (e.g. "method.lpips=0")."""
    if used and not (lpips_net.vgg_path or lpips_net.random_init):
        weights.unset("LPIPS VGG16 + linear heads", "method.lpips_net.vgg_path, lin_path",
                      "LPIPS needs weights: set method.lpips_net.vgg_path and lin_path "
                      f"(or method.lpips_net.random_init=true for a demo), or {switch_off}")


def check_convnext_weights(convnext_net: Any, used: bool, switch_off: str) -> None:
    """ValueError unless a ConvNeXt perceptual network that is used has weights (or is a declared
    random-weight demo); `switch_off`: the setting that turns its term off (e.g. "method.convnext=0")."""
    if used and not (convnext_net.path or convnext_net.random_init):
        weights.unset("ConvNeXt-S perceptual", "method.convnext_net.path", "the ConvNeXt-S perceptual term needs weights: set method.convnext_net.path (torchvision's "
                         "convnext_small-0c510722.pth or a save_pretrained folder of facebook/convnext-small-224), or "
                         f"method.convnext_net.random_init=true for a demo, or {switch_off}")
