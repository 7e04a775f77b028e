"""Attention backends agree with each other; bad backend names fail clearly."""
from __future__ import annotations

import pytest
import torch

from system.models.attention import attention, causal_mask, flash_available, resolve_backend


def _qkv(lq=9, lk=9, b=2, h=3, d=16, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mk = lambda l: torch.randn(b, h, l, d, generator=g).to(device=device, dtype=dtype)
    return mk(lq), mk(lk), mk(lk)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_math(causal):
    q, k, v = _qkv()
    a = attention(q, k, v, causal=causal, backend="sdpa")
    m = attention(q, k, v, causal=causal, backend="math")
    assert a.shape == q.shape
    torch.testing.assert_close(a, m, atol=1e-5, rtol=1e-5)


def test_masked_bool_and_float_match_math():
    q, k, v = _qkv(lq=5, lk=12)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 1, 5, 12, generator=g) > 0.4
    mask[..., 0] = True  # no fully masked row
    a = attention(q, k, v, mask=mask, backend="sdpa")
    m = attention(q, k, v, mask=mask, backend="math")
    torch.testing.assert_close(a, m, atol=1e-5, rtol=1e-5)
    fmask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(attention(q, k, v, mask=fmask, backend="math"), m, atol=1e-5, rtol=1e-5)


def test_causal_with_longer_keys_is_bottom_right():
    q, k, v = _qkv(lq=3, lk=7)
    out = attention(q, k, v, causal=True, backend="sdpa")
    ref = attention(q, k, v, mask=causal_mask(3, 7), backend="math")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # last query row sees every key = full attention for that row
    full = attention(q[:, :, -1:], k, v, backend="math")
    torch.testing.assert_close(out[:, :, -1:], full, atol=1e-5, rtol=1e-5)


def test_causal_mask_changes_output():
    q, k, v = _qkv()
    assert not torch.allclose(attention(q, k, v, causal=True), attention(q, k, v, causal=False))


def test_backend_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):
        attention(q, k, v, backend="cuda")
    with pytest.raises(RuntimeError, match="'flash' cannot run"):
        attention(q, k, v, backend="flash")  # CPU float32 can never use flash
    assert resolve_backend("auto", q) == "sdpa"


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_backends_agree_bf16(causal):
    q, k, v = _qkv(lq=64, lk=64, b=2, h=4, d=64, dtype=torch.bfloat16, device="cuda")
    ref = attention(q, k, v, causal=causal, backend="math").float()
    sdpa = attention(q, k, v, causal=causal, backend="sdpa").float()
    torch.testing.assert_close(sdpa, ref, atol=2e-2, rtol=2e-2)
    if flash_available():
        fl = attention(q, k, v, causal=causal, backend="flash").float()
        torch.testing.assert_close(fl, ref, atol=2e-2, rtol=2e-2)
        assert resolve_backend("auto", q) == "flash"
