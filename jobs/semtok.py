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
evaluate.yaml); the pipeline sets the keys that chain them (system/config/pipelines.py). A step
whose output exists is skipped: resubmitting a killed job continues at the step it was in.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, also under `ray job submit`

from system.config import exit_on_config_error  # noqa: E402
from system.config.pipelines import (  # noqa: E402
    SEMTOK_SECTION_DEFAULTS, SemTokPipelineConfig, pipeline_cli_config, semtok_folders, semtok_wiring)

DEFAULTS: list[str] = []
KEYS = {"vae": ("psnr", "val_psnr_trained"), "latents": ("views", "bytes_per_view"), "stage1": ("loss", "bit_usage", "val_psnr_trained"),
        "stage2": ("psnr", "val_psnr_trained", "val_psnr_stage1"), "pretokenize": ("views",), "ar": ("loss", "acc", "bit_acc"),
        "sample": ("num_images", "images_per_s"),
        "evaluate": ("generation/fid", "generation/inception_score", "reconstruction/psnr", "reconstruction/ssim",
                     "reconstruction/bits_per_pixel", "reconstruction/ar_masked_token_accuracy")}


def steps(cfg: SemTokPipelineConfig, root: str) -> list:
    """The pipeline's steps (those in `cfg.steps`), each over its section."""
    from cluster.pipeline import ar_step, evaluate_step, latents_step, pretokenize_step, sample_step, tokenizer_step

    f = semtok_folders(root)
    s1 = cfg.stage1.method
    make = {
        "vae": lambda: tokenizer_step("vae", cfg.vae, ("step", "loss", "psnr"), f"[{cfg.run_name}] VAE done",
                                      describe=f"a small SD3.5-shaped VAE fitted to the images -> {f['vae']}"),
        "latents": lambda: latents_step(cfg.latents, describe=f"{cfg.latents.augment} views' VAE latents -> {f['latents']}"),
        "stage1": lambda: tokenizer_step("stage1", cfg.stage1, ("step", "loss", "loss/diff", "bit_usage"),
                                         f"[{cfg.run_name}] stage I done",
                                         describe=f"{s1.tokenizer} flow-matching tokenizer -> {f['stage1']}"),
        "stage2": lambda: tokenizer_step("stage2", cfg.stage2, ("step", "loss", "psnr"), f"[{cfg.run_name}] stage II done",
                                         {"stage1": cfg.stage2.method.stage1_export},
                                         describe=f"one-step refiner on the frozen stage I tokens -> {f['stage2']}"),
        "pretokenize": lambda: pretokenize_step(cfg.pretokenize, describe=f"{cfg.images} -> {f['tokens']}"),
        "ar": lambda: ar_step(cfg.ar, ("loss", "acc", "bit_acc"), describe=f"masked {cfg.ar.method.model} on {f['tokens']} "
                                                                          f"-> {f['ar']}"),
        "sample": lambda: sample_step(cfg.sample, describe=f"{cfg.sample.cfg_scale} CFG -> {f['samples']}"),
        "evaluate": lambda: evaluate_step(cfg.evaluate, describe=f"-> {f['eval']}"),
    }
    return [make[name]() for name in cfg.steps]


def main(argv: list[str]) -> int:
    cfg = pipeline_cli_config(SemTokPipelineConfig, argv, DEFAULTS, SEMTOK_SECTION_DEFAULTS, semtok_wiring)
    from cluster.pipeline import run_pipeline_job
    from cluster.training import resolve_job
    from system.data.embedded import ensure_embedded_data

    if cfg.embedded:  # the image shard sets every step reads (stage I's data.url may be the latent cache)
        images = dataclasses.replace(cfg.stage1.data, url=cfg.images, val_url=cfg.val_images, embedded=True)
        exit_on_config_error(lambda: ensure_embedded_data(images))
    first = ("vae", "stage1") if "latents" not in cfg.steps else ("vae",)
    for name in first:  # their checks need no earlier step's output: before Ray
        if name in cfg.steps:
            exit_on_config_error(lambda: resolve_job(getattr(cfg, name)))
    return run_pipeline_job(cfg, lambda root: steps(cfg, root), KEYS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
