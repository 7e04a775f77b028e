#!/usr/bin/env python
"""AliTok end to end as one resumable pipeline on a Ray cluster: stage 1 (causal decoder) ->
stage 2 (bidirectional decoder) -> pre-tokenize -> AR -> sample -> evaluate.

  python jobs/alitok_xl.py storage_path=s3://bucket/runs images=s3://bucket/imagenet/train \
      val_images=s3://bucket/imagenet/val                                   # paper sizes, AliTok-XL
  python jobs/alitok_xl.py --config configs/experiments/alitok_tiny.yaml    # embedded demo, 2 CPU cores
  python jobs/alitok_xl.py ... ar.method.model=alitok-l sample.cfg_scale=6.0 sample.cfg_power=0.7

Each section (stage1, stage2, pretokenize, ar, sample, evaluate) is the config of that step's own
job (jobs/alitok.py, pretokenize.py, train_ar.py, sample.py, evaluate.py) starting from its
defaults; the pipeline sets the keys that chain them (system/config/pipelines.py). A step whose
output exists is skipped: resubmitting a killed job continues at the step it was in.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, also under `ray job submit`

from system.config import exit_on_config_error  # noqa: E402
from system.config.pipelines import (  # noqa: E402
    ALITOK_SECTION_DEFAULTS, AliTokPipelineConfig, alitok_folders, alitok_wiring, pipeline_cli_config)

DEFAULTS = ["experiments/alitok_xl.yaml"]
KEYS = {"stage1": ("psnr", "codebook_usage", "probe/acc", "val_psnr_trained"), "stage2": ("psnr", "val_psnr_trained"),
        "pretokenize": ("views",), "ar": ("loss", "acc"), "sample": ("num_images", "images_per_s"),
        "evaluate": ("generation/fid", "generation/inception_score", "reconstruction/psnr",
                     "reconstruction/ar_next_token_accuracy")}


def steps(cfg: AliTokPipelineConfig, root: str) -> list:
    """The pipeline's steps (those in `cfg.steps`), each over its section."""
    from cluster.pipeline import ar_step, evaluate_step, pretokenize_step, sample_step, tokenizer_step

    f = alitok_folders(root)
    kind = "causal" if cfg.stage1.method.decoder_causal else "bidirectional"
    s1_keys = ("step", "loss", "psnr", "prefix_psnr", "codebook_usage", "probe/acc")
    make = {
        "stage1": lambda: tokenizer_step("stage1", cfg.stage1, s1_keys, f"[{cfg.run_name}] stage 1 done",
                                         describe=f"{kind}-decoder tokenizer -> {f['stage1']}"),
        "stage2": lambda: tokenizer_step("stage2", cfg.stage2, ("step", "loss", "psnr", "codebook_usage"),
                                         f"[{cfg.run_name}] stage 2 done", {"stage1": cfg.stage2.method.stage1_export},
                                         describe=f"bidirectional decoder on the frozen encoder -> {f['stage2']}"),
        "pretokenize": lambda: pretokenize_step(cfg.pretokenize, describe=f"{cfg.images} -> {f['tokens']}"),
        "ar": lambda: ar_step(cfg.ar, describe=f"{cfg.ar.method.model} on {f['tokens']} -> {f['ar']}"),
        "sample": lambda: sample_step(cfg.sample, describe=f"{cfg.sample.cfg_schedule} CFG {cfg.sample.cfg_scale} "
                                                           f"-> {f['samples']}"),
        "evaluate": lambda: evaluate_step(cfg.evaluate, describe=f"-> {f['eval']}"),
    }
    return [make[name]() for name in cfg.steps]


def main(argv: list[str]) -> int:
    cfg = pipeline_cli_config(AliTokPipelineConfig, argv, DEFAULTS, ALITOK_SECTION_DEFAULTS, alitok_wiring)
    from cluster.pipeline import run_pipeline_job
    from cluster.training import resolve_job
    from system.data.embedded import ensure_embedded_data

    exit_on_config_error(lambda: ensure_embedded_data(cfg.stage1.data))
    if "stage1" in cfg.steps:
        exit_on_config_error(lambda: resolve_job(cfg.stage1))  # the first step's checks, before Ray
    return run_pipeline_job(cfg, lambda root: steps(cfg, root), KEYS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
