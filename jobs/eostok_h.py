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

from system.config import EOSTokExperiment, cli_config, exit_on_config_error  # noqa: E402

DEFAULTS = ["base.yaml", "data/imagenet.yaml", "model/eostok_h.yaml", "experiments/eostok_h.yaml"]


def check(exp: EOSTokExperiment) -> None:
    """Config errors found before Ray starts (exit 2): the method's own checks against the data."""
    from cluster.train_pool import resolve_job

    resolve_job(exp)


def main(argv: list[str]) -> int:
    cfg = cli_config(EOSTokExperiment, argv, DEFAULTS)
    from system.data.embedded import ensure_embedded_data

    ensure_embedded_data(cfg.data)
    exit_on_config_error(lambda: check(cfg))  # exit 2 with the message before any worker starts

    from cluster.train_pool import run_training

    result = run_training(cfg)
    summary = {"run": result.run_url, "step": result.step, "checkpoint": result.checkpoint_url,
               "export": result.export_url, "metrics": result.metrics}
    if cfg.data.val_url and result.export_url:
        from system.methods.eostok import val_psnr_report

        summary["val_psnr_db"] = psnr = val_psnr_report(cfg, result.export_url)
        print(f"validation PSNR: untrained {psnr['untrained']:.2f} dB -> trained {psnr['trained']:.2f} dB "
              f"(EMA {psnr['trained_ema']:.2f} dB)")
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
