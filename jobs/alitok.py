#!/usr/bin/env python
"""AliTok tokenizer training on Ray Train + DeepSpeed ZeRO: stage 1 or stage 2 (`stage=1|2`).

  python jobs/alitok.py data.url=s3://bucket/imagenet/train                       # stage 1, paper sizes
  python jobs/alitok.py stage=2 data.url=... method.stage1_export=runs/alitok-stage1/export
  python jobs/alitok.py --config configs/experiments/alitok_tiny_stage1.yaml       # embedded demo: stage 1,
  python jobs/alitok.py --config configs/experiments/alitok_tiny_stage2.yaml       # then stage 2 on it

Stage 1 trains the tokenizer with a causal decoder; its codes are what the AR model learns
(jobs/pretokenize.py reads either stage's export: both encode alike). Stage 2 trains a
bidirectional decoder on the frozen stage-1 encoder and exports the tokenizer that decodes AR
samples. Re-running with the same run_name resumes from the newest committed checkpoint.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, also under `ray job submit`

from system.config import AliTokStage1Experiment, AliTokStage2Experiment, peek  # noqa: E402

SCHEMAS = {1: AliTokStage1Experiment, 2: AliTokStage2Experiment}
DEFAULTS = {s: ["base.yaml", "data/imagenet.yaml", f"experiments/alitok_stage{s}.yaml"] for s in SCHEMAS}


def main(argv: list[str]) -> int:
    from cluster.cli import job_config, run_job
    from cluster.console import say
    from cluster.training import train

    stage = peek(argv, "stage", 1)
    stage = stage if stage in SCHEMAS else 1  # any other value: the schema names the error
    cfg = job_config(SCHEMAS[stage], argv, DEFAULTS[stage])  # exit 2 on a bad config, before Ray

    if cfg.data.embedded:
        say(f"[{cfg.run_name}] stage {cfg.stage}; data: the embedded real photos at {cfg.data.url}")
    out = run_job(lambda: train(cfg, title=f"[{cfg.run_name}] stage {cfg.stage} done", extra={"stage": cfg.stage}))
    export = out["export"]
    if export and cfg.stage == 1:
        print(f"stage 2:     python jobs/alitok.py stage=2 method.stage1_export={export} data.url={cfg.data.url}")
    if export:
        print(f"pretokenize: python jobs/pretokenize.py export_url={export} src={cfg.data.url} out=<token shards>")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
