"""Losses: reconstruction, LPIPS, GAN, NTP, APR, representation alignment, frozen teachers."""
from system.losses.align import (
    AlignConfig,
    ContrastiveConfig,
    DecoderAlignLoss,
    DirectAlignLoss,
    ImplicitAlignLoss,
    SemanticContrastiveLoss,
    SemanticDistillLoss,
)
from system.losses.gan import (
    DiscriminatorConfig,
    GANLoss,
    GANLossConfig,
    LeCamEMA,
    PatchDiscriminator,
    adaptive_gan_weight,
    gan_start_factor,
    hinge_d_loss,
    hinge_g_loss,
)
from system.losses.lpips import LPIPS
from system.losses.recon import apr_loss, l1_loss, l2_loss, ntp_loss
from system.losses.teachers import Teacher, TeacherConfig, build_teacher

__all__ = [
    "AlignConfig", "ContrastiveConfig", "DecoderAlignLoss", "DirectAlignLoss", "ImplicitAlignLoss", "SemanticContrastiveLoss",
    "SemanticDistillLoss", "DiscriminatorConfig", "GANLoss", "GANLossConfig", "LeCamEMA", "PatchDiscriminator",
    "adaptive_gan_weight", "gan_start_factor", "hinge_d_loss", "hinge_g_loss", "LPIPS", "apr_loss", "l1_loss",
    "l2_loss", "ntp_loss", "Teacher", "TeacherConfig", "build_teacher",
]
