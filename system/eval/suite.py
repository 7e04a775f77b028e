"""The evaluation run behind jobs/evaluate.py (pure PyTorch): generation metrics of a sample npz
and reconstruction metrics of a tokenizer export on a shard set, assembled into one report.

Generation: FID (against stored reference statistics when the real Inception weights are used,
else against features of the reference images), Inception Score, improved precision/recall.
Reconstruction: rFID (reconstructions vs originals), PSNR, SSIM, LPIPS on uint8-rounded images,
codebook usage/perplexity of the codes, and the AR model's next-token accuracy on them.
"""
from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from system.config.eval_schema import EvaluateConfig
from system.config import StorageConfig, redacted_dict
from system.data.embedded import ensure_embedded_dataset
from system.data.stream import ShardReader
from system.data.storage import protocol, read_bytes
from system.eval.fid import feature_stats, fid_from_features, frechet_distance
from system.eval.inception import InceptionV3FID, extract_features
from system.eval.inception_score import inception_score
from system.eval.prdc import precision_recall
from system.eval.recon_metrics import ReconMeter, build_lpips
from system.eval.report import build_report
from system.eval.sample_parts import to_uint8
from system.eval.token_metrics import codebook_perplexity, codebook_usage, next_token_accuracy
from system.models.artifacts import Generator, read_model_json
from system.models.tokenizers import load_tokenizer
from system.sampling.generators import load_generator


@dataclass
class Reference:
    """The generation reference: its images' features and/or stored (mu, sigma)."""

    source: str
    features: Optional[np.ndarray] = None  # (N, 2048); needed for precision/recall
    stats: Optional[tuple[np.ndarray, np.ndarray]] = None  # stored ADM statistics (real Inception only)

    @property
    def num_images(self) -> int:
        return 0 if self.features is None else len(self.features)


def load_npz(url: str, storage: StorageConfig | None = None) -> dict[str, np.ndarray]:
    """All arrays of an npz at a local path or object-store URL."""
    if protocol(url) == "file":
        try:
            with np.load(url) as f:
                return {k: f[k] for k in f.files}
        except FileNotFoundError:
            raise FileNotFoundError(f"npz not found: {url}") from None
    with np.load(io.BytesIO(read_bytes(url, storage))) as f:
        return {k: f[k] for k in f.files}


def sample_images(url: str, storage: StorageConfig | None = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(uint8 (N, H, W, 3), labels or None) of a sample npz in ADM layout."""
    data = load_npz(url, storage)
    if "arr_0" not in data:
        raise KeyError(f"{url}: no 'arr_0' images (keys: {sorted(data)}); expected an ADM-format sample npz")
    images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{url}['arr_0']: expected uint8 (N, H, W, 3) images; got {images.dtype} {images.shape}")
    return images, data.get("labels", data.get("arr_1"))


def shard_batches(cfg: EvaluateConfig, resolution: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images (B, 3, R, R) in [-1, 1], labels (B,)) of `cfg.shards`, one pass, center crops, at most max_images."""
    if cfg.embedded:
        split = "train" if cfg.shards.rstrip("/").endswith("train") else "val"
        ensure_embedded_dataset(cfg.shards, cfg.storage, split=split, resolution=max(resolution, 64))
    reader = ShardReader(cfg.shards, batch_size=cfg.batch_size, resolution=resolution, random_flip=False,
                         storage=cfg.storage, drop_last=False)
    seen = 0
    for batch in reader.one_epoch():
        take = batch["image"].shape[0] if not cfg.max_images else min(batch["image"].shape[0], cfg.max_images - seen)
        yield batch["image"][:take], batch["label"][:take]
        seen += take
        if cfg.max_images and seen >= cfg.max_images:
            return


class Evaluator:
    """Holds the metric networks and the reference features computed so far (shared between the
    generation reference and the reconstruction originals when both are the same shard images)."""

    def __init__(self, cfg: EvaluateConfig, device: str | torch.device | None = None):
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.inception = InceptionV3FID(cfg.inception_path, preprocess=cfg.inception_preprocess).to(self.device)
        self._shard_feats: dict[int, np.ndarray] = {}

    def features(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return extract_features(self.inception, images, batch_size=self.cfg.batch_size, device=self.device)

    def shard_features(self, resolution: int) -> np.ndarray:
        if resolution not in self._shard_feats:
            feats = [self.features(torch.from_numpy(to_uint8(img)).permute(0, 3, 1, 2))[0]
                     for img, _ in shard_batches(self.cfg, resolution)]
            self._shard_feats[resolution] = np.concatenate(feats)
        return self._shard_feats[resolution]

    def reference(self, resolution: int) -> Reference:
        cfg = self.cfg
        if not cfg.reference:
            return Reference(f"{cfg.shards} ({resolution}px center crops)", self.shard_features(resolution))
        data = load_npz(cfg.reference, cfg.storage)
        feats = self.features(data["arr_0"])[0] if "arr_0" in data else None
        if "mu" in data and "sigma" in data and self.inception.pretrained:
            stats = (data["mu"].astype(np.float64), data["sigma"].astype(np.float64))
            return Reference(f"{cfg.reference} (stored statistics)", feats, stats)
        if feats is None:
            raise ValueError(
                f"reference {cfg.reference} holds only statistics (keys: {sorted(data)}), made with the real Inception; "
                "with a random-weight Inception give inception_path=<pt_inception weights> or a reference with images (arr_0)"
            )
        return Reference(f"{cfg.reference} (images)", feats)

    def generation(self) -> dict:
        cfg = self.cfg
        images, labels = sample_images(cfg.samples, cfg.storage)
        ref = self.reference(images.shape[1])  # first: a bad reference fails before the long part
        feats, logits = self.features(images)
        if ref.stats is not None:
            fid = frechet_distance(*feature_stats(feats), *ref.stats, device=self.device)
        else:
            fid = fid_from_features(feats, ref.features, device=self.device)
        is_mean, is_std = inception_score(logits, splits=min(cfg.is_splits, len(feats)))
        out = {
            "samples": cfg.samples, "num_images": int(len(feats)), "resolution": int(images.shape[1]),
            "num_classes": int(len(np.unique(labels))) if labels is not None else None,
            "reference": ref.source, "reference_images": ref.num_images,
            "fid": fid,
            "inception_score": is_mean, "inception_score_std": is_std,
        }
        k = cfg.pr_k
        if ref.features is not None and min(len(ref.features), len(feats)) > k:
            out.update(precision_recall(ref.features, feats, k=k, device=self.device))
        else:
            out.update(precision=None, recall=None, precision_note=f"needs reference images and more than k={k} per set")
        return out

    @torch.no_grad()
    def reconstruction(self, lpips: torch.nn.Module | None) -> dict:
        """Reconstruction metrics of the export's tokenizer (any registered kind); the AR model's
        next-token accuracy on its codes when the export has one (part "ar")."""
        cfg = self.cfg
        tok = load_tokenizer(cfg.export_url, cfg.storage, ema=cfg.ema, device=self.device)
        gen = None
        if "ar" in read_model_json(cfg.export_url, cfg.storage):
            gen = load_generator(cfg.export_url, tok, cfg.storage, ema=cfg.ema, device=self.device)
        res = tok.image_size
        if res is None:
            if gen is None:
                raise ValueError(f"the tokenizer of {cfg.export_url} takes any image size and the export has no AR "
                                 "model to fix one; evaluate an export with an 'ar' part")
            res = tok.image_size_for(gen.seq_len)
        masked = gen is not None and gen.masked
        meter = ReconMeter(lpips, data_range=1.0)
        orig_feats, rec_feats, codes, correct, counted = [], [], [], 0.0, 0
        cached = self._shard_feats.get(res)
        for images, labels in shard_batches(cfg, res):
            images, labels = images.to(self.device), labels.to(self.device)
            batch_codes = tok.encode(images)  # (B, L)
            orig = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2)  # uint8 (B, 3, R, R)
            rec = torch.from_numpy(to_uint8(tok.reconstruct(images))).permute(0, 3, 1, 2)
            meter.update(orig.float() / 255, rec.float() / 255)
            if cached is None:
                orig_feats.append(self.features(orig)[0])
            rec_feats.append(self.features(rec)[0])
            codes.append(batch_codes.cpu())
            if gen is not None and bool((labels < gen.num_classes).all()):
                correct += held_out_accuracy(gen, batch_codes, labels) * labels.numel()
                counted += labels.numel()
        originals = cached if cached is not None else np.concatenate(orig_feats)
        recons = np.concatenate(rec_feats)
        self._shard_feats.setdefault(res, originals)
        all_codes, k = torch.cat(codes), tok.vocab_size
        return {
            "export_url": cfg.export_url, "shards": cfg.shards, "num_images": int(len(recons)), "resolution": res,
            "rfid": fid_from_features(originals, recons, device=self.device),
            **{k_: v for k_, v in meter.compute().items() if k_ != "num_images"},
            "codebook_size": k, "codebook_usage": codebook_usage(all_codes, k),
            "codebook_perplexity": codebook_perplexity(all_codes, k),
            "bits_per_pixel": math.log2(k) * all_codes.shape[1] / res**2,  # log2|C| K / (H W)
            ("ar_masked_token_accuracy" if masked else "ar_next_token_accuracy"): correct / counted if counted else None,
        }


HELD_OUT_MASK_RATIO = 0.85  # a masked model's held-out accuracy: this fraction of each sequence masked (seeded)


def held_out_accuracy(gen: Generator, codes: torch.Tensor, labels: torch.Tensor) -> float:
    """The AR model's token accuracy on held-out codes: next-token prediction with teacher forcing,
    or for a masked (bidirectional) model the masked positions of a seeded random mask of
    HELD_OUT_MASK_RATIO of each sequence (bitwise heads: a token counts when all its bits do)."""
    if not gen.masked:
        return next_token_accuracy(gen(codes, labels), codes)
    g = torch.Generator(device="cpu").manual_seed(0)
    b, n = codes.shape
    order = torch.rand(b, n, generator=g).argsort(-1).argsort(-1).to(codes.device)
    mask = order < max(1, round(HELD_OUT_MASK_RATIO * n))
    pred = gen.predict_masked(codes, labels, mask)  # (B, L) ids
    return float((pred == codes)[mask].double().mean())


def run_evaluation(cfg: EvaluateConfig, device: str | torch.device | None = None) -> dict:
    """All metrics the config asks for -> the report dict (see system.eval.report)."""
    t0 = time.time()
    ev = Evaluator(cfg, device)
    lpips = None
    if cfg.export_url:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a random-weight LPIPS is the same network in every run
            lpips = build_lpips(cfg.lpips.vgg_path, cfg.lpips.lin_path).to(ev.device)
    generation = ev.generation() if cfg.samples else None
    reconstruction = ev.reconstruction(lpips) if cfg.export_url else None
    return build_report(
        inception_label=ev.inception.label, inception_pretrained=ev.inception.pretrained,
        lpips_pretrained=None if lpips is None else bool(lpips.pretrained),
        generation=generation, reconstruction=reconstruction, config=redacted_dict(cfg),
        device=str(ev.device), seconds=time.time() - t0,
    )
