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


def main(argv: list[str]) -> int:
    from cluster.cli import job_config, run_job
    from cluster.console import say
    from cluster.training import train

    cfg = job_config(EOSTokExperiment, argv, DEFAULTS)  # exit 2 on a bad config, before Ray

    if cfg.data.embedded:
        say(f"[{cfg.run_name}] data: the embedded real photos at {cfg.data.url} (val: {cfg.data.val_url})")
    out = run_job(lambda: train(cfg))
    if out["export"]:
        print(f"sample:   python jobs/sample.py export_url={out['export']} num_per_class=8\n"
              f"evaluate: python jobs/evaluate.py samples={out['run']}/samples/samples.npz export_url={out['export']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
