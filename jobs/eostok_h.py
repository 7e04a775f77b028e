#!/usr/bin/env python
"""EOSTok end-to-end training on Ray Train + DeepSpeed ZeRO.

  python jobs/eostok_h.py data.url=s3://bucket/imagenet/train data.storage.endpoint_url=...
  ray job submit --working-dir . -- python jobs/eostok_h.py data.url=s3://...   # on a cluster
  python jobs/eostok_h.py --config configs/model/eostok_l.yaml ...              # S / L sizes
  python jobs/eostok_h.py --config configs/experiments/eostok_tiny.yaml         # embedded demo

Defaults: the paper's H configuration (configs/experiments/eostok_h.yaml). Re-running with the
same run_name resumes from the newest committed checkpoint.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, also under `ray job submit`

from system.config import EOSTokExperiment  # noqa: E402

DEFAULTS = ["base.yaml", "data/imagenet.yaml", "model/eostok_h.yaml", "experiments/eostok_h.yaml"]


def check(exp: EOSTokExperiment) -> None:
    """Config errors found before Ray starts (exit 2): the method's own checks against the data."""
    from cluster.train_pool import resolve_job

    resolve_job(exp)


def main(argv: list[str]) -> int:
    from cluster.console import say, table
    from cluster.train_pool import job_config, run_job, run_training

    cfg = job_config(EOSTokExperiment, argv, DEFAULTS, check)  # exit 2 on a bad config, before Ray

    if cfg.data.embedded:
        say(f"[{cfg.run_name}] data: the embedded real photos at {cfg.data.url} (val: {cfg.data.val_url})")
    result = run_job(lambda: run_training(cfg))
    m = result.metrics
    rows = [(k, m[k]) for k in ("step", "loss", "psnr", "codebook_usage", "ar_acc", "images_per_s") if k in m]
    summary = {"run": result.run_url, "step": result.step, "checkpoint": result.checkpoint_url,
               "export": result.export_url, "metrics": m}
    if cfg.data.val_url and result.export_url:
        from system.methods.tokenizer_training import val_psnr_report

        summary["val_psnr_db"] = psnr = val_psnr_report(cfg, result.export_url)
        rows.append(("val PSNR (dB)", f"untrained {psnr['untrained']:.2f} -> trained {psnr['trained']:.2f} "
                                      f"(EMA {psnr['trained_ema']:.2f})"))
    run = result.run_url
    rows += [("checkpoint", result.checkpoint_url), ("export", result.export_url),
             ("sample grid", f"{run}/samples/step_{result.step:08d}.png"), ("curves", f"{run}/curves.png"),
             ("metrics", f"{run}/metrics.jsonl"), ("logs", f"{run}/logs/")]
    from system.data.storage import write_bytes_atomic

    write_bytes_atomic(f"{run}/result.json", json.dumps(summary, indent=1, default=str).encode(), cfg.data.storage)
    print(table(f"[{cfg.run_name}] done", rows))
    if result.export_url:
        print(f"sample:   python jobs/sample.py export_url={result.export_url} num_per_class=8\n"
              f"evaluate: python jobs/evaluate.py samples={run}/samples/samples.npz export_url={result.export_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
