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
    from cluster.console import say
    from cluster.train_pool import job_config, report_tokenizer_run, run_job, run_training

    cfg = job_config(EOSTokExperiment, argv, DEFAULTS, check)  # exit 2 on a bad config, before Ray

    if cfg.data.embedded:
        say(f"[{cfg.run_name}] data: the embedded real photos at {cfg.data.url} (val: {cfg.data.val_url})")
    result = run_job(lambda: run_training(cfg))
    report_tokenizer_run(cfg, result, ("step", "loss", "psnr", "codebook_usage", "ar_acc", "images_per_s"),
                         f"[{cfg.run_name}] done")
    run = result.run_url
    if result.export_url:
        print(f"sample:   python jobs/sample.py export_url={result.export_url} num_per_class=8\n"
              f"evaluate: python jobs/evaluate.py samples={run}/samples/samples.npz export_url={result.export_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
