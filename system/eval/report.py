"""The evaluation report: one JSON-able dict, a printed table and flat metrics for wandb (pure).

Layout:
  {"inception": {"label", "pretrained"}, "lpips": {"label", "pretrained"} | None,
   "generation": {fid, inception_score, precision, recall, ...} | None,
   "reconstruction": {rfid, psnr, ssim, lpips, codebook_usage, ...} | None,
   "warnings": [...], "device", "seconds", "time", "config"}
Metrics from random-weight networks are flagged in `warnings` and in the table's section titles,
so nobody mistakes them for published numbers.
"""
from __future__ import annotations

import math
import time
from typing import Any, Optional

from system.eval.inception import RANDOM_WEIGHTS_LABEL

RANDOM_LPIPS_LABEL = "random-weight LPIPS (not a real LPIPS)"
REAL_LPIPS_LABEL = "LPIPS v0.1 (VGG16)"
GENERATION_KEYS = ("fid", "inception_score", "inception_score_std", "precision", "recall", "density", "coverage")
RECON_KEYS = ("rfid", "psnr", "ssim", "lpips", "bits_per_pixel", "codebook_usage", "codebook_perplexity",
              "ar_next_token_accuracy", "ar_masked_token_accuracy")


def _clean(v: Any) -> Any:
    """JSON-safe: numpy scalars -> Python, non-finite floats -> None."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def build_report(
    *,
    inception_label: str,
    inception_pretrained: bool,
    lpips_pretrained: Optional[bool],
    generation: Optional[dict],
    reconstruction: Optional[dict],
    config: Optional[dict] = None,
    device: str = "",
    seconds: float = 0.0,
) -> dict:
    warnings = []
    if not inception_pretrained:
        warnings.append(f"FID, IS, precision/recall and rFID use a {RANDOM_WEIGHTS_LABEL}: give inception_path")
    if lpips_pretrained is False:
        warnings.append(f"LPIPS uses a {RANDOM_LPIPS_LABEL}: give lpips.vgg_path and lpips.lin_path")
    lpips = None if lpips_pretrained is None else {
        "label": REAL_LPIPS_LABEL if lpips_pretrained else RANDOM_LPIPS_LABEL, "pretrained": lpips_pretrained}
    return _clean({
        "inception": {"label": inception_label, "pretrained": inception_pretrained},
        "lpips": lpips,
        "generation": generation,
        "reconstruction": reconstruction,
        "warnings": warnings,
        "device": device,
        "seconds": round(seconds, 3),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config or {},
    })


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"
    return str(v)


def format_table(report: dict) -> str:
    """Human-readable table of the report's metrics, one section per evaluation."""
    lines = []
    inc = report["inception"]["label"]
    gen, rec = report.get("generation"), report.get("reconstruction")
    if gen:
        lines.append(f"generation: {gen.get('num_images')} images of {gen.get('samples')} vs {gen.get('reference')}")
        lines.append(f"  [{inc}]")
        lines += [f"  {k:<26}{_fmt(gen.get(k))}" for k in GENERATION_KEYS if k in gen]
    if rec:
        lines.append(f"reconstruction: {rec.get('num_images')} images of {rec.get('shards')} through {rec.get('export_url')}")
        lpips = report.get("lpips") or {}
        lines.append(f"  [rFID: {inc}; LPIPS: {lpips.get('label', 'n/a')}]")
        lines += [f"  {k:<26}{_fmt(rec.get(k))}" for k in RECON_KEYS if k in rec]
    for w in report.get("warnings", []):
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)


def flat_metrics(report: dict) -> dict[str, float]:
    """{"generation/fid": ..., "reconstruction/psnr": ...}: the numeric metrics, for wandb."""
    out = {}
    for section, keys in (("generation", GENERATION_KEYS), ("reconstruction", RECON_KEYS + ("codebook_size",))):
        for k in keys:
            v = (report.get(section) or {}).get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{section}/{k}"] = float(v)
    return out
