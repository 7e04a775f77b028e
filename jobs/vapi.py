#!/usr/bin/env python
"""VAπ pixel-space post-training (GRPO) of an AR image generator: a Ray rollout actor pool and a
Ray Train + DeepSpeed learner pool running the one rank loop (cluster/training.py; the method and
its rollouts: system/methods/vapi.py, system/methods/vapi_rollouts.py).

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


def main(argv: list[str]) -> int:
    from cluster.cli import job_config, run_job
    from cluster.training import train

    cfg = job_config(VapiExperiment, argv, DEFAULTS)  # exit 2 on a bad config, before Ray

    out = run_job(lambda: train(cfg))
    if out.get("heldout_start") is not None:
        end = out["heldout_end"]
        print(f"held-out teacher-forced reward: {out['heldout_start']:.4f} -> " + (f"{end:.4f}" if end is not None else "(no export)"))
    print(json.dumps({"run": out["run"], "step": out["step"], "groups": out["groups"],
                      "rollout_reissued": out["rollout_reissued"], "learner_restarts": out["learner_restarts"],
                      "last": out["metrics"]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
