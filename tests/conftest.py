"""Shared pytest fixtures and markers (GPU tests are skipped where CUDA is absent)."""
from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's V2 controller for short test runs (each job and bench subprocess inherits these): it
# polls its workers every 0.25 s instead of 2 s (a run's end is seen sooner: 2-6 s per job run here),
# and runs neither the node-preemption watcher nor the state actor's reconciliation loop
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU-only machines)")
    config.addinivalue_line("markers", "slow: end-to-end tests that start Ray clusters")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 endpoint (moto's server on 127.0.0.1, a free port) for s3fs; yields its URL.

    Sets fake AWS credentials in the environment for the session; creates no buckets."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.delenv("AWS_PROFILE", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def fake_flash_kvcache(monkeypatch):
    """flash-attn's ``flash_attn_with_kvcache`` as its docstring defines it, in torch, installed as
    usable (no GPU needed): layout (B, L, H, D), any strides with a contiguous last dim, int32
    ``cache_seqlens`` (B,); with ``causal``, key j of row b is visible to query i iff
    j <= cache_seqlens[b] - Lq + i. Yields the list of the ``cache_seqlens`` of each call."""
    from system.models import attention as A

    calls: list[list[int]] = []

    def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=None, causal=False):
        assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
        assert cache_seqlens.dtype == torch.int32 and cache_seqlens.shape == (q.shape[0],)
        assert cache_seqlens.is_contiguous()
        calls.append(cache_seqlens.tolist())
        lq, out = q.shape[1], []
        for b in range(q.shape[0]):
            n = int(cache_seqlens[b])
            qb, kb, vb = (t.transpose(0, 1)[None] for t in (q[b], k_cache[b, :n], v_cache[b, :n]))  # (1, H, L, D)
            mask = A.causal_mask(lq, n) if causal else None
            out.append(A.attention(qb, kb, vb, mask=mask, backend="math")[0].transpose(0, 1))
        return torch.stack(out)

    monkeypatch.setattr(A, "_flash_attn_with_kvcache", flash_attn_with_kvcache)
    monkeypatch.setattr(A, "_flash_kv_reason", lambda q, k, v: None)
    yield calls
