"""The VAπ driver: `run_vapi(cfg)` starts the rollout pool (plain Ray actors in a placement group,
owned here so they outlive learner restarts), then runs the GRPO learner as a Ray Train +
DeepSpeed pool (`cluster.train_pool.run_pool` with `cluster.vapi_learner.vapi_learner_worker`),
and returns what the run did (read back from the run folder)."""
from __future__ import annotations

import json
import uuid
from typing import Any, Callable, Optional

from cluster.train_pool import prepare_run, run_pool
from cluster.vapi_learner import RESULT_FILE, SESSIONS_FILE, vapi_learner_worker
from cluster.vapi_pool import ObjectStorePublisher, PartsFn, RolloutPool, default_parts
from system.config.vapi_schema import check_vapi_config


def run_vapi(cfg, parts_fn: PartsFn = default_parts,
             reader_factory: Optional[Callable[[Any, int, int], Any]] = None) -> dict:
    """Post-train with VAπ to `cfg.train.max_steps` iterations (resuming a committed checkpoint when
    `checkpoint.resume`). Returns step, trained group ids, held-out reward start/end, the metric
    history, rollout re-issues and learner restarts of this submission."""
    check_vapi_config(cfg)
    m = cfg.method
    cfg, store, use_gpu = prepare_run(cfg, extra_cpus=m.num_rollout_workers * m.cpus_per_rollout_worker,
                                      extra_gpus=m.num_rollout_workers * m.gpus_per_rollout_worker)
    publisher = ObjectStorePublisher()
    pool = RolloutPool(cfg, parts_fn, publisher, store.root + "/fault" if store.local else None)
    submission = uuid.uuid4().hex
    try:
        run_pool(cfg, use_gpu, vapi_learner_worker,
                 {"rollouts": pool.client(), "publisher": publisher, "parts_fn": parts_fn,
                  "submission": submission, "reader_factory": reader_factory})
    finally:
        pool.close()
    raw = store.read_bytes(RESULT_FILE)
    if raw is None:
        raise RuntimeError(f"the learner pool finished without writing {store.url(RESULT_FILE)}")
    result = json.loads(raw)
    sessions = [s for s in store.read_jsonl(SESSIONS_FILE) if s["submission"] == submission]
    result.update(history=store.read_jsonl("metrics.jsonl"), learner_restarts=max(len(sessions) - 1, 0),
                  run_url=store.run_url)
    return result
