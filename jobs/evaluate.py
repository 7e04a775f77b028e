"""Metrics of a sample npz (FID, IS, precision/recall) and/or of a tokenizer export on a shard set
(rFID, PSNR, SSIM, LPIPS, codebook usage/perplexity, AR next-token accuracy).

    python jobs/evaluate.py samples=runs/x/samples/samples.npz reference=VIRTUAL_imagenet256_labeled.npz \
        inception_path=pt_inception-2015-12-05-6726825d.pth
    python jobs/evaluate.py export_url=runs/x/export shards=s3://bucket/imagenet/val max_images=50000

Writes <out>/report.json, prints a table, logs to wandb (offline by default). Without
inception_path the Inception network has random weights and the report says so ("random-weight
Inception (not a real FID)"). Without `reference` the images of `shards` (by default the embedded
real-photo set) are the reference. Config errors exit with status 2 before Ray starts.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from system.config import cli_config, exit_on_config_error  # noqa: E402
from system.config.load import dry_run_requested  # noqa: E402
from system.config.eval_schema import EvaluateConfig, check_evaluate_config  # noqa: E402
from system.data.storage import join, write_bytes_atomic  # noqa: E402


def default_out(cfg: EvaluateConfig) -> str:
    src = (cfg.samples or cfg.export_url).rstrip("/")
    return join(src.rsplit("/", 1)[0] if "/" in src else ".", "eval")


def main(argv: list[str]) -> int:
    cfg = cli_config(EvaluateConfig, argv, defaults=["evaluate.yaml"], check=check_evaluate_config)
    if not cfg.out:
        cfg = dataclasses.replace(cfg, out=default_out(cfg))
    if dry_run_requested(argv):  # its checks and inputs, start nothing
        from system.pipelines.dry_run import run_dry
        from system.pipelines.steps import EvaluateStep

        exit_on_config_error(lambda: run_dry("evaluate", [EvaluateStep(name="evaluate", cfg=cfg)], cfg.out, cfg.storage))
        return 0
    from cluster.eval_pool import evaluate, log_to_wandb  # imports Ray only once the config is valid
    from system.eval.report import format_table

    report = evaluate(cfg)
    write_bytes_atomic(join(cfg.out, "report.json"), json.dumps(report, indent=1).encode(), cfg.storage)
    log_to_wandb(report, cfg, cfg.out)
    print(format_table(report))
    print(f"report: {join(cfg.out, 'report.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
