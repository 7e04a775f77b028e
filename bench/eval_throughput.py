"""Evaluation throughput: Inception feature extraction (images/s) and FID time for 2048-d features.

CPU (default; random-weight Inception, which costs the same as the real one):
    .venv/bin/python bench/eval_throughput.py
GPU:
    python bench/eval_throughput.py --device cuda --batch 200 --iters 10

FID timing covers the statistics (mean/covariance of N x 2048 features) and the Frechet distance,
whose cost is the matrix square root: scipy ``sqrtm`` on CPU vs the torch eigen-decomposition path
on CPU (and on CUDA when present). Both FID values are printed so their agreement is visible.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.sampling import device_name, timed  # noqa: E402
from system.eval.fid import feature_stats, frechet_distance  # noqa: E402
from system.eval.inception import InceptionV3FID  # noqa: E402

ANCHOR = "reference: scipy sqrtm of 2048x2048 takes minutes on CPU, seconds on GPU (REFERENCE.md)"


def bench_inception(device: torch.device, batch: int, size: int, iters: int, weights: str | None) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = InceptionV3FID(weights).to(device)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    with torch.inference_mode():
        model(images)  # warm-up
        return batch * iters / timed(lambda: [model(images) for _ in range(iters)], device)


def fake_features(n: int, d: int, seed: int, shift: float) -> np.ndarray:
    """Correlated features with a full-rank covariance, like real pool3 activations."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return np.abs(rng.normal(size=(n, d)) @ mix + shift)  # ReLU-like, non-negative


def bench_fid(n: int, d: int, devices: list[str]) -> list[tuple[str, float, float]]:
    f1, f2 = fake_features(n, d, 0, 0.0), fake_features(n, d, 1, 0.05)
    t = time.perf_counter()
    (mu1, s1), (mu2, s2) = feature_stats(f1), feature_stats(f2)
    stats_s = time.perf_counter() - t
    rows = [("statistics (numpy, both sets)", stats_s, float("nan"))]
    for name in devices:
        backend, dev = ("scipy", "cpu") if name == "scipy" else ("torch", name.split(":", 1)[1])
        if dev == "cuda":  # initialise the context outside the timed region
            torch.zeros(1, device=dev)
            torch.cuda.synchronize()
        t = time.perf_counter()
        fid = frechet_distance(mu1, s1, mu2, s2, backend=backend, device=dev)
        if dev == "cuda":
            torch.cuda.synchronize()
        rows.append((f"frechet_distance [{backend}, {dev}]", time.perf_counter() - t, fid))
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="device for Inception extraction: cpu | cuda")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=256, help="input size before the resize to 299")
    ap.add_argument("--weights", default=None, help="pt_inception-2015-12-05-6726825d.pth (optional)")
    ap.add_argument("--num-features", type=int, default=10000, help="N per set for the FID timing")
    ap.add_argument("--feature-dim", type=int, default=2048)
    ap.add_argument("--skip-scipy", action="store_true", help="skip the (slow) scipy sqrtm timing")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    print(f"device: {device_name(device)} | torch {torch.__version__}")
    ips = bench_inception(device, args.batch, args.image_size, args.iters, args.weights)
    print(f"Inception feature extraction ({'pretrained' if args.weights else 'random weights'}): "
          f"{ips:.2f} images/s  (batch {args.batch}, {args.image_size}px -> 299, {args.iters} iters)")

    fid_devices = ([] if args.skip_scipy else ["scipy"]) + ["torch:cpu"]
    if torch.cuda.is_available():
        fid_devices.append("torch:cuda")
    rows = bench_fid(args.num_features, args.feature_dim, fid_devices)
    print(f"\nFID for {args.feature_dim}-d features, N={args.num_features} per set  ({ANCHOR})")
    print(f"{'step':<42}{'seconds':>10}{'FID':>16}")
    for name, secs, fid in rows:
        print(f"{name:<42}{secs:>10.2f}{'' if np.isnan(fid) else f'{fid:16.6f}'}")
    fids = [fid for _, _, fid in rows if not np.isnan(fid)]
    if len(fids) > 1:
        print(f"max |FID difference| between paths: {max(fids) - min(fids):.2e}")
    result = {
        "device": device_name(device),
        "inception_images_per_s": ips,
        "inception_batch": args.batch,
        "fid": [{"step": n, "seconds": s, "fid": None if np.isnan(f) else f} for n, s, f in rows],
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
