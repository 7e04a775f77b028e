#!/usr/bin/env python
"""SemTok end to end as one resumable pipeline on a Ray cluster: [vae ->] [latents ->] stage I
(flow-matching decoder) -> stage II (one-step refiner) -> pre-tokenize -> masked AR -> sample -> evaluate.

  python jobs/semtok.py storage_path=s3://bucket/runs images=s3://bucket/imagenet/train \\
      val_images=s3://bucket/imagenet/val stage1.method.vae.path=/models/sd3.5-medium \\
      stage1.method.teacher.path=/models/siglip2-so400m-patch16-256      # paper sizes, SemTok 2^18 + AR-L
  python jobs/semtok.py --config configs/experiments/semtok_tiny.yaml     # embedded demo, 2 CPU cores
  python jobs/semtok.py ... steps=[stage1]                                # one stage alone
  python jobs/semtok.py ... steps=[latents,stage1,stage2,pretokenize,ar,sample,evaluate]   # VAE latents cached once
  python jobs/semtok.py ... stage1.method.tokenizer=semtok-32 ar.method.model=semtok-ar-xl

Each section (vae, latents, stage1, stage2, pretokenize, ar, sample, evaluate) is the config of that step
starting from its defaults (configs/experiments/semtok_*.yaml, ar_semtok.yaml, sample.yaml,
evaluate.yaml); the pipeline (system/pipelines/semtok.py) sets the keys that chain them. A step
whose output exists is skipped: resubmitting a killed job continues at the step it was in.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, also under `ray job submit`

from system.pipelines.semtok import SEMTOK  # noqa: E402


def main(argv: list[str]) -> int:
    from cluster.pipeline import run_pipeline_job

    return run_pipeline_job(SEMTOK, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
