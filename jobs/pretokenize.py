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
from system.config.load import dry_run_requested  # noqa: E402


def main(argv: list[str]) -> int:
    from system.pipelines.encode import TokenEncoding

    cfg = cli_config(PretokenizeConfig, argv)
    if dry_run_requested(argv):  # plan the encoding (output size; no weights read), start nothing
        from system.pipelines.dry_run import run_dry
        from system.pipelines.steps import EncodeStep

        exit_on_config_error(lambda: run_dry("pretokenize", [EncodeStep(name="pretokenize", encoding=TokenEncoding(cfg))],
                                             cfg.out, cfg.storage))
        return 0
    enc = exit_on_config_error(lambda: TokenEncoding(cfg).prepare())  # exit 2 before Ray
    from cluster.console import say, table
    from cluster.encode_pool import run_encoding

    s = run_encoding(enc)
    say(table(f"pretokenize: done -> {cfg.out}", enc.rows(s)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
