"""ImageNet-layout folder -> WebDataset shards + index.json on any fsspec URL, written by Ray tasks.

    python jobs/make_shards.py src=/data/imagenet out=s3://bucket/imagenet \
        storage.endpoint_url=http://minio:9000 [shard_size=1000] [--config FILE]

A re-run skips complete shards. Config errors exit with status 2 before Ray starts.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from system.config import MakeShardsConfig, cli_config, exit_on_config_error, to_yaml  # noqa: E402
from system.config.load import dry_run_requested  # noqa: E402


def main(argv: list[str]) -> int:
    cfg = cli_config(MakeShardsConfig, argv, defaults=["make_shards.yaml"])
    if dry_run_requested(argv):  # the plan of every split from the source listing (no image read), start nothing
        from cluster.shards import plan_all

        _, plans = exit_on_config_error(lambda: plan_all(cfg))
        for split, ps in plans.items():
            print(json.dumps({"split": split, "shards": len(ps), "num_samples": sum(len(p.items) for p in ps),
                              "out": f"{cfg.out.rstrip('/')}/{split}"}))
        return 0
    print(to_yaml(cfg))
    from cluster.runtime import init_ray
    from cluster.shards import make_shards  # imports Ray only once the config is valid

    init_ray(cfg.cluster)
    indexes = make_shards(cfg)
    for split, index in indexes.items():
        print(json.dumps({"split": split, "shards": len(index["shards"]), "num_samples": index["num_samples"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
