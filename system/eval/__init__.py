"""Evaluation metrics (pure PyTorch + numpy/scipy): FID/IS/precision-recall, reconstruction, tokens."""
from system.eval.fid import (
    StreamingStats,
    feature_stats,
    fid_from_features,
    frechet_distance,
    load_npz_images,
    load_stats,
    reference_stats,
    save_stats,
)
from system.eval.inception import RANDOM_WEIGHTS_LABEL, InceptionV3FID, extract_features
from system.eval.inception_score import inception_score
from system.eval.prdc import knn_radii, precision_recall
from system.eval.recon_metrics import ReconMeter, build_lpips, lpips_distance, psnr, ssim
from system.eval.sqrtm import sqrtm_newton_schulz, sqrtm_psd_torch, sqrtm_scipy, trace_sqrt_product
from system.eval.token_metrics import codebook_perplexity, codebook_usage, next_token_accuracy

__all__ = [
    "InceptionV3FID",
    "RANDOM_WEIGHTS_LABEL",
    "ReconMeter",
    "StreamingStats",
    "build_lpips",
    "codebook_perplexity",
    "codebook_usage",
    "extract_features",
    "feature_stats",
    "fid_from_features",
    "frechet_distance",
    "inception_score",
    "knn_radii",
    "load_npz_images",
    "load_stats",
    "lpips_distance",
    "next_token_accuracy",
    "precision_recall",
    "psnr",
    "reference_stats",
    "save_stats",
    "sqrtm_newton_schulz",
    "sqrtm_psd_torch",
    "sqrtm_scipy",
    "ssim",
    "trace_sqrt_product",
]
