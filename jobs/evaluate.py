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
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from system.config import ConfigError, load_config  # noqa: E402
from system.config.eval_schema import EvaluateConfig, check_evaluate_config  # noqa: E402
from system.data.storage import join, protocol, write_bytes_atomic  # noqa: E402


def _abs(url: str | None) -> str | None:
    """Local paths made absolute (Ray workers may run elsewhere); URLs unchanged."""
    return os.path.abspath(url) if url and protocol(url) == "file" else url


def default_out(cfg: EvaluateConfig) -> str:
    src = (cfg.samples or cfg.export_url).rstrip("/")
    return join(src.rsplit("/", 1)[0] if "/" in src else ".", "eval")


def main(argv: list[str]) -> int:
    try:
        cfg = load_config(EvaluateConfig, argv, defaults=["evaluate.yaml"])
        check_evaluate_config(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = {k: _abs(getattr(cfg, k)) for k in ("samples", "export_url", "reference", "shards", "inception_path")}
    cfg = dataclasses.replace(cfg, **paths)
    cfg = dataclasses.replace(cfg, out=_abs(cfg.out or default_out(cfg)))
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
