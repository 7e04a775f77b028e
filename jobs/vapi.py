#!/usr/bin/env python
"""VAπ pixel-space post-training (GRPO) of an AR image generator: a Ray rollout actor pool and a
Ray Train + DeepSpeed learner pool running the one rank loop (cluster/rollout_pool.py).

  python jobs/vapi.py --config configs/experiments/vapi_tiny.yaml            # embedded demo (after `make demo`)
  python jobs/vapi.py run_name=vapi data.url=s3://bucket/imagenet/train method.export_url=s3://.../export \
      method.lpips_net.vgg_path=/w/vgg16.pth method.lpips_net.lin_path=/w/vgg.pth
  python jobs/vapi.py run_name=vapi-llamagen data.resolution=384 method.export_url=null \
      method.llamagen_gpt=/w/c2i_XXL_384.pt method.llamagen_vq=/w/vq_ds16_c2i.pt method.gpt_overrides.block_size=576 ...
  ray job submit --working-dir . -- python jobs/vapi.py ...                  # on a cluster

Defaults are the paper's run (about 100 updates of 128 images x group 8, clip 0.2, adv clip 5, beta 0.1,
lr 1e-6, 1% of the shards, update in train mode) and
post-train `runs/eostok-h/export`, the output of jobs/eostok_h.py. Re-running with the same run_name
resumes from the newest committed learner checkpoint (checkpoint.resume=false refuses instead).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, also under `ray job submit`

from system.config import VapiExperiment  # noqa: E402

DEFAULTS = ["data/imagenet.yaml", "experiments/vapi.yaml"]


def check(exp: VapiExperiment) -> None:
    from cluster.rollout_pool import check_vapi_experiment

    check_vapi_experiment(exp)


def main(argv: list[str]) -> int:
    from cluster.rollout_pool import run_vapi
    from cluster.cli import job_config, run_job

    cfg = job_config(VapiExperiment, argv, DEFAULTS, check)  # exit 2 on a bad config, before Ray

    out = run_job(lambda: run_vapi(cfg))
    if out.get("heldout_start") is not None:
        print(f"held-out teacher-forced reward: {out['heldout_start']:.4f} -> {out['heldout_end']:.4f}")
    last = out["history"][-1] if out["history"] else {}
    print(json.dumps({"run": out["run_url"], "step": out["step"], "groups": len(out["groups"]),
                      "rollout_reissued": out["rollout_reissued"], "learner_restarts": out["learner_restarts"],
                      "last": last}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
