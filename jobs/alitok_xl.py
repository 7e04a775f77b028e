#!/usr/bin/env python
"""AliTok end to end as one resumable pipeline on a Ray cluster: stage 1 (causal decoder) ->
stage 2 (bidirectional decoder) -> pre-tokenize -> AR -> sample -> evaluate.

  python jobs/alitok_xl.py storage_path=s3://bucket/runs images=s3://bucket/imagenet/train \
      val_images=s3://bucket/imagenet/val                                   # paper sizes, AliTok-XL
  python jobs/alitok_xl.py --config configs/experiments/alitok_tiny.yaml    # embedded demo, 2 CPU cores
  python jobs/alitok_xl.py ... ar.method.model=alitok-l sample.cfg_scale=6.0 sample.cfg_power=0.7

Each section (stage1, stage2, pretokenize, ar, sample, evaluate) is the config of that step's own
job (jobs/alitok.py, pretokenize.py, train_ar.py, sample.py, evaluate.py) starting from its
defaults; the pipeline (system/pipelines/alitok.py) sets the keys that chain them. A step whose
output exists is skipped: resubmitting a killed job continues at the step it was in.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, also under `ray job submit`

from system.pipelines.alitok import ALITOK  # noqa: E402


def main(argv: list[str]) -> int:
    from cluster.pipeline import run_pipeline_job

    return run_pipeline_job(ALITOK, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
