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


# ------------------------------------------------------------- flash-attn on the device it runs on
@pytest.fixture
def fake_device(monkeypatch):
    """flash-attn 'installed' and a CUDA device of a chosen capability and build (no GPU needed);
    returns a dict to set: capability, archs (None: unreadable), probe (its error or None), calls."""
    from system.models import attention as A

    state = {"capability": (8, 0), "archs": {("sm", 80), ("sm", 90)}, "probe": None, "calls": 0}

    def capability(index):
        state["calls"] += 1
        return state["capability"]

    monkeypatch.setattr(A, "_flash_attn_func", lambda *a, **k: None)
    monkeypatch.setattr(A, "_device_reasons", {})
    monkeypatch.setattr(A, "flash_archs", lambda: state["archs"])
    monkeypatch.setattr(A, "_probe", lambda index: state["probe"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Test GPU")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return state


def _cuda_q(dtype=torch.bfloat16, index=0):
    """What resolve_backend reads of q, as a CUDA tensor would answer."""
    from types import SimpleNamespace

    return SimpleNamespace(is_cuda=True, dtype=dtype, shape=(2, 4, 16, 64), device=torch.device("cuda", index))


def test_flash_on_a_device_its_build_covers(fake_device):
    from system.models.attention import flash_device_reason

    for cap in [(8, 0), (8, 6), (8, 9), (9, 0)]:  # A100, A10, L40S, H100 with an sm_80 + sm_90 build
        fake_device["capability"] = cap
        assert flash_device_reason(cap[0] * 10 + cap[1]) is None, cap
    assert resolve_backend("auto", _cuda_q(index=80)) == "flash"
    assert resolve_backend("auto", _cuda_q(torch.float32, index=80)) == "sdpa"  # dtype still decides first


def test_sm90_build_on_an_a100_falls_back_to_sdpa_logged_once(fake_device, caplog):
    fake_device["archs"] = {("sm", 90)}
    with caplog.at_level("WARNING", logger="system.models.attention"):
        assert resolve_backend("auto", _cuda_q()) == "sdpa"
        assert resolve_backend("auto", _cuda_q()) == "sdpa"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "kernels for sm_90 only" in warnings[0] and "sm_80" in warnings[0]
    assert fake_device["calls"] == 1  # decided once per device
    with pytest.raises(RuntimeError, match="'flash' cannot run: the installed flash-attn has kernels for sm_90 only"):
        resolve_backend("flash", _cuda_q())
    fake_device["capability"] = (9, 0)  # another device is decided on its own
    assert resolve_backend("auto", _cuda_q(index=1)) == "flash"
    assert resolve_backend("auto", _cuda_q(index=0)) == "sdpa"


def test_old_cards_and_unreadable_builds(fake_device):
    from system.models.attention import flash_device_reason

    fake_device["capability"] = (7, 5)  # T4: below flash-attn 2's minimum, whatever the build
    assert "compute capability 7.5; flash-attn 2 needs 8.0 or newer" in flash_device_reason(0)
    fake_device.update(capability=(8, 0), archs=None, probe="a test call failed (RuntimeError: no kernel image)")
    assert "no kernel image" in flash_device_reason(1)  # build unreadable: the test call decides
    fake_device["probe"] = None
    assert flash_device_reason(2) is None


def test_device_decision_is_a_constant_under_torch_compile(fake_device):
    from system.models.attention import flash_device_reason

    fake_device["archs"] = {("sm", 90)}

    def pick(x):
        return x + 1 if flash_device_reason(0) is None else x - 1

    out = torch.compile(pick, backend="eager", fullgraph=True)(torch.zeros(2))  # fullgraph: a graph break raises
    assert out.tolist() == [-1.0, -1.0]


def test_importing_attention_does_not_import_dynamo_and_marks_as_torch_does():
    """The module's own `assume_constant_result` marks what torch.compiler's does, without the
    import of torch._dynamo (1-4 s in every process) that torch's decorator costs."""
    import subprocess
    import sys

    from system.models.attention import assume_constant_result

    code = "import sys, system.models.attention; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    ours, theirs = assume_constant_result(lambda: None), torch.compiler.assume_constant_result(lambda: None)
    assert vars(theirs) and vars(theirs) == vars(ours)


# ------------------------------------------------------------------------------ KV-cache attention
def _cache(b=2, h=3, lmax=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, lmax, d, generator=g), torch.randn(b, h, lmax, d, generator=g)


def _masked_reference(q, k, v, pos):
    mask = torch.arange(k.shape[2])[None, :] <= pos[:, None]
    return attention(q, k, v, mask=mask, backend="sdpa")


@pytest.mark.parametrize("positions", [[0], [5], [11], [3, 4, 5, 6], [0, 1, 2]])
def test_cache_attention_reads_the_filled_part_with_the_same_numbers(positions):
    from system.models.attention import cache_attention, host_span, masked_cache_attention

    pos = torch.tensor(positions)
    k, v = _cache()
    k[:, :, pos[-1] + 1:] = float("nan")  # never written: must not be read
    v[:, :, pos[-1] + 1:] = float("nan")
    q = torch.randn(2, 3, len(positions), 16, generator=torch.Generator().manual_seed(1))
    assert host_span(pos) == (positions[0], len(positions))
    out = cache_attention(q, k, v, pos)
    assert torch.isfinite(out).all()
    k, v = torch.nan_to_num(k), torch.nan_to_num(v)
    ref = _masked_reference(q, k, v, pos)
    assert (out - ref).abs().max() < 1e-6
    with masked_cache_attention():  # the reference path, forced
        torch.testing.assert_close(cache_attention(q, k, v, pos), ref, atol=0, rtol=0)


def test_cache_attention_with_other_positions_keeps_the_masked_rule():
    from system.models.attention import cache_attention, host_span

    k, v = _cache()
    q = torch.randn(2, 3, 3, 16)
    for pos in (torch.tensor([2, 7, 4]), torch.tensor([[1, 2, 3]])[0, ::2]):  # not consecutive
        assert host_span(pos) is None
        torch.testing.assert_close(cache_attention(q[:, :, : len(pos)], k, v, pos),
                                   _masked_reference(q[:, :, : len(pos)], k, v, pos), atol=0, rtol=0)


@pytest.mark.parametrize("positions,on_host", [([6], True), ([6], False), ([2, 3, 4], True)])
def test_flash_kv_cache_call_follows_its_contract(fake_flash_kvcache, monkeypatch, positions, on_host):
    from system.models import attention as A

    calls = fake_flash_kvcache
    k, v = _cache(b=3)
    q = torch.randn(3, 3, len(positions), 16)
    pos = torch.tensor(positions)
    if not on_host:  # a device position: no host span, the length is computed as a tensor
        monkeypatch.setattr(A, "host_span", lambda p: None)
    out = A.cache_attention(q, k, v, pos)
    assert calls == [[positions[-1] + 1] * 3]
    assert (out - _masked_reference(q, k, v, pos)).abs().max() < 1e-6
