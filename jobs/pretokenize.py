#!/usr/bin/env python
"""Image shards -> token shards (the codes of every augmented view) for AR training, on a Ray map pool.

  python jobs/pretokenize.py src=s3://bucket/imagenet/train out=s3://bucket/tokens/eostok_h/train \
      export_url=runs/eostok_h/export augment=ten-crop [storage.endpoint_url=...]

One token shard per image shard (or per `shard_size` of its images), written by actors that load
the tokenizer once (`num_actors`, `cluster.gpus_per_worker`). A re-run skips finished shards; a
dead actor's shard goes to a fresh actor. Config errors exit with status 2 before Ray starts.
Storage per view: system/encode/pretokenize.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, also under `ray job submit`

from system.config import PretokenizeConfig, cli_config, exit_on_config_error  # noqa: E402


def main(argv: list[str]) -> int:
    cfg = cli_config(PretokenizeConfig, argv)
    from cluster.pretokenize_pool import prepare, pretokenize, summary_rows

    index, info, meta = exit_on_config_error(lambda: prepare(cfg))  # exit 2 before Ray
    from cluster.console import say, table
    from cluster.runtime import init_ray

    init_ray(cfg.cluster)
    s = pretokenize(cfg, index, info, meta)
    say(table(f"pretokenize: done -> {cfg.out}", summary_rows(cfg, index, info, s)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
