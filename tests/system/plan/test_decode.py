"""Decode plans: one KV-cache decode step at full length (CFG doubles the rows), a masked GPT's
full-forward steps, and one VAπ rollout call, on fake tensors."""
from __future__ import annotations

import dataclasses

import pytest

from system.models.registry import gpt_config
from system.plan.cards import card
from system.plan.decode import plan_rollout, plan_sampling


def test_kv_cache_decode_step_by_hand():
    cfg = gpt_config("llamagen-xxl")
    plan = plan_sampling(cfg, batch=32, cfg_scale=4.0, card="h200")
    rows, length = 64, cfg.cls_token_num + cfg.seq_len
    assert (plan.kind, plan.rows, plan.images, plan.steps) == ("kv-cache", rows, 32, cfg.seq_len)
    assert plan.cache_bytes == cfg.n_layer * 2 * rows * length * cfg.dim * 4  # k and v, fp32 like the weights
    assert plan.weights_bytes > 5e9  # 1.4B parameters in fp32
    # one token for 64 rows: ~2 N FLOPs per row (+ attention over the full static cache)
    n_matmul = cfg.n_layer * (4 * cfg.dim**2 + 3 * cfg.dim * cfg.mlp_hidden) + cfg.dim * cfg.vocab_size
    assert plan.flops_per_step == pytest.approx(2 * rows * n_matmul, rel=0.1)
    # a decode step reads every weight and the whole cache: memory-bound on the card's bandwidth
    c = card("h200")
    assert plan.bound == "memory" and plan.step_seconds == pytest.approx(
        (plan.weights_bytes + plan.cache_bytes) / (c.bandwidth * 0.7))
    assert plan.seconds_per_image == pytest.approx(plan.step_seconds * cfg.seq_len / 32)
    no_cfg = plan_sampling(cfg, batch=32, cfg_scale=1.0)
    assert no_cfg.rows == 32 and no_cfg.cache_bytes == plan.cache_bytes // 2


def test_masked_generator_runs_full_forwards():
    cfg = dataclasses.replace(gpt_config("semtok-ar-l"), n_layer=2, block_size=64, n_bits=18, vocab_size=1 << 18)
    plan = plan_sampling(cfg, batch=4, cfg_scale=2.0, steps=16, precision="fp32")
    assert (plan.kind, plan.rows, plan.steps, plan.cache_bytes) == ("masked", 8, 16, 0)
    assert plan.flops_per_step > 2 * 8 * 64 * cfg.n_layer * 12 * cfg.dim**2 * 0.9  # a full forward of 8 x 64 tokens


def test_vapi_rollout(tiny):
    case = tiny["vapi"]
    plan = plan_rollout(case.exp.method, case.data, images=2)
    g = case.exp.method.group_size
    assert (plan.kind, plan.rows, plan.images) == ("rollout", 2 * g, 2)
    assert plan.flops_per_step > 0 and plan.activation_bytes > 0 and plan.weights
