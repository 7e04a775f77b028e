#!/usr/bin/env python
"""EOSTok end to end as one resumable pipeline on a Ray cluster: EOSTok joint training -> pre-tokenize
its codes -> two-stage baseline ARs side by side -> VAπ post-training of the joint AR -> sample and
evaluate before and after VAπ, with the before/after table.

  python jobs/eostok_pipeline.py --config configs/experiments/eostok_pipeline_tiny.yaml   # embedded demo, 2 CPU cores
  python jobs/eostok_pipeline.py storage_path=s3://bucket/runs images=s3://bucket/imagenet/train \
      val_images=s3://bucket/imagenet/val ...                                            # paper sizes (EOSTok-H)
  python jobs/eostok_pipeline.py ... steps=[eostok,vapi,sample,evaluate]                  # without the baselines

Each section (eostok, pretokenize, baseline, vapi, sample_before, evaluate_before, sample, evaluate)
is the config of that step's own job starting from its defaults; the pipeline
(system/pipelines/eostok.py) sets the keys that chain them. A step whose output exists is skipped:
resubmitting a killed job continues at the step it was in.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, also under `ray job submit`

from system.pipelines.eostok import EOSTOK  # noqa: E402


def main(argv: list[str]) -> int:
    from cluster.pipeline import run_pipeline_job

    return run_pipeline_job(EOSTOK, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
