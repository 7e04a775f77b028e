"""Sample N images (default 50 per class x all classes) from an exported AR run over a Ray actor pool.

    python jobs/sample.py export_url=runs/eostok-h/export [out=runs/eostok-h/samples] \
        cfg_scale=2.0 cfg_schedule=power-cosine num_per_class=50 seed=0 [--config FILE]

Writes <out>/parts/part_*.npz (a re-run skips finished parts), <out>/samples.npz (arr_0: uint8
N x H x W x 3 in ADM layout, labels, codes) and <out>/grids/*.png. Config errors exit with
status 2 before Ray starts. Same seed and settings -> identical samples, whatever the actor count.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from system.config import cli_config, exit_on_config_error, to_yaml  # noqa: E402
from system.config.load import dry_run_requested  # noqa: E402
from system.config.eval_schema import SampleConfig, check_sample_config  # noqa: E402


def main(argv: list[str]) -> int:
    cfg = cli_config(SampleConfig, argv, defaults=["sample.yaml"], check=check_sample_config)
    if dry_run_requested(argv):  # plan one decode step at full length (memory, time per image), start nothing
        from cluster.sample_pool import default_out
        from system.pipelines.dry_run import run_dry
        from system.pipelines.steps import SampleStep

        out = cfg.out or default_out(cfg.export_url)
        exit_on_config_error(lambda: run_dry("sample", [SampleStep(name="sample", cfg=cfg)], out, cfg.storage))
        return 0
    print(to_yaml(cfg))
    from cluster.runtime import init_ray  # imports Ray only once the config is valid
    from cluster.sample_pool import run_sampling

    init_ray(cfg.cluster)
    summary = run_sampling(cfg)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
