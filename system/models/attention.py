"""One scaled-dot-product attention function with selectable backends, and KV-cache attention.

Backends: "flash" (flash-attn 2, CUDA + fp16/bf16 only), "sdpa" (torch SDPA),
"math" (explicit softmax reference), "auto" (flash when usable, else sdpa).

Mask convention (as torch SDPA): a bool mask is True where attention is
allowed; a float mask is added to the scores. Masks broadcast to
(B, H, Lq, Lk). ``causal=True`` with Lk > Lq (a KV cache) aligns the causal
diagonal bottom-right: query i sees keys 0 .. Lk - Lq + i.

flash-attn is used only on a device it has kernels for: compute capability 8.0 or newer (its
minimum) and an architecture the installed build was compiled for (read from the extension's
fatbins, system/models/cuda_archs.py; when they cannot be read, one small flash call on the device
decides). The answer is kept per device and a refusal is logged once; ``auto`` then uses SDPA.

``cache_attention`` attends new queries over a static KV cache (sampling): flash-attn's
``flash_attn_with_kvcache`` when usable, else the cache cut to its filled part without a mask when
the positions are known on the host, else the whole cache under a mask (the reference path, which
``masked_cache_attention()`` forces).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from system.models.cuda_archs import describe, extension_archs, runs_on

try:  # optional dependency
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
    from flash_attn import flash_attn_with_kvcache as _flash_attn_with_kvcache  # type: ignore
except Exception:  # ImportError, or a broken CUDA build
    _flash_attn_func = _flash_attn_with_kvcache = None

BACKENDS = ("auto", "flash", "sdpa", "math")
FLASH_MIN_CAPABILITY = (8, 0)  # flash-attn 2: Ampere, Ada, Hopper (and newer)
FLASH_EXTENSION = "flash_attn_2_cuda"  # the compiled module flash_attn imports

log = logging.getLogger(__name__)
_device_reasons: dict[int, Optional[str]] = {}  # CUDA device index -> why flash cannot run there (None: it can)
_masked_cache = [False]  # masked_cache_attention() is active


def flash_available() -> bool:
    """True when the flash-attn package imported."""
    return _flash_attn_func is not None


def flash_archs() -> Optional[set[tuple[str, int]]]:
    """The GPU architectures the installed flash-attn extension has kernels for (None: unknown)."""
    spec = importlib.util.find_spec(FLASH_EXTENSION)
    if spec is None or not spec.origin:
        return None
    try:
        return extension_archs(spec.origin)
    except (OSError, ValueError):
        return None


def _probe(index: int) -> Optional[str]:
    """One tiny flash-attn call on the device: None when it runs, else its error (e.g. 'no kernel image')."""
    try:
        x = torch.zeros(1, 1, 1, 64, device=torch.device("cuda", index), dtype=torch.float16)
        _flash_attn_func(x, x, x)
        torch.cuda.synchronize(index)
        return None
    except Exception as e:  # noqa: BLE001 - any failure means: do not use flash here
        return f"a test call failed on this device ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})"


def _device_reason(index: int) -> tuple[Optional[str], bool]:
    """(why flash-attn cannot run on CUDA device ``index`` or None, whether the answer is final)."""
    cap = tuple(torch.cuda.get_device_capability(index))
    name = f"{torch.cuda.get_device_name(index)} (sm_{cap[0]}{cap[1]})"
    if cap < FLASH_MIN_CAPABILITY:
        return (f"{name} has compute capability {cap[0]}.{cap[1]}; flash-attn 2 needs "
                f"{FLASH_MIN_CAPABILITY[0]}.{FLASH_MIN_CAPABILITY[1]} or newer (Ampere, Ada, Hopper)"), True
    archs = flash_archs()
    if archs is not None:
        if runs_on(archs, cap):
            return None, True
        return (f"the installed flash-attn has kernels for {describe(archs)} only, none that runs on {name}; "
                f"rebuild it with FLASH_ATTN_CUDA_ARCHS including {cap[0]}{cap[1]}"), True
    if torch.cuda.is_current_stream_capturing():  # no test call inside a CUDA graph capture: decide later
        return None, False
    return _probe(index), True


def assume_constant_result(fn):
    """`torch.compiler.assume_constant_result` without its `import torch._dynamo` (1-4 s in every
    process that imports this module, most of which never compile): the decorator only marks `fn`
    (tests/system/models/test_attention.py checks that the marks agree)."""
    fn._dynamo_marked_constant = True
    return fn


@assume_constant_result
def flash_device_reason(index: Optional[int] = None) -> Optional[str]:
    """Why flash-attn cannot run on CUDA device ``index`` (default: the current one); None when it
    can. Decided once per device (a constant for torch.compile); a refusal is logged once."""
    index = torch.cuda.current_device() if index is None else index
    if index not in _device_reasons:
        reason, final = _device_reason(index)
        if not final:
            return reason
        _device_reasons[index] = reason
        if reason is not None:
            log.warning("attention on cuda:%d uses SDPA, not flash-attn: %s", index, reason)
    return _device_reasons[index]


def _flash_reason(q: Tensor, mask: Tensor | None) -> str | None:
    """Why flash-attn cannot run these inputs (None when it can)."""
    if _flash_attn_func is None:
        return "the flash_attn package is not installed"
    if not q.is_cuda:
        return f"tensors are on {q.device}, flash-attn needs CUDA"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype is {q.dtype}, flash-attn needs float16 or bfloat16"
    if mask is not None:
        return "an explicit mask was given, flash-attn supports only causal/no mask"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    return flash_device_reason(q.device.index)


def causal_mask(lq: int, lk: int, device: torch.device | str | None = None) -> Tensor:
    """Bool (lq, lk) mask, True where allowed, diagonal aligned bottom-right."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + (lk - lq)


def _merge_masks(q: Tensor, k: Tensor, causal: bool, mask: Tensor | None) -> Tensor | None:
    """Fold ``causal`` into ``mask``; returns a bool or float mask or None."""
    if not causal:
        return mask
    cm = causal_mask(q.shape[-2], k.shape[-2], q.device)
    if mask is None:
        return cm
    if mask.dtype == torch.bool:
        return mask & cm
    return mask.masked_fill(~cm, float("-inf"))


def _math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v.float()).to(q.dtype)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Tensor | None, dropout_p: float) -> Tensor:
    if causal and mask is None and q.shape[-2] == k.shape[-2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    m = _merge_masks(q, k, causal, mask)
    if m is not None and m.dtype != torch.bool:
        m = m.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=dropout_p)


def _flash(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float) -> Tensor:
    # flash-attn layout is (B, L, H, D); its causal mask is aligned bottom-right like ours.
    out = _flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, causal=causal
    )
    return out.transpose(1, 2)


def resolve_backend(backend: str, q: Tensor, mask: Tensor | None = None) -> str:
    """Concrete backend name ("flash", "sdpa" or "math") for these inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "flash" if _flash_reason(q, mask) is None else "sdpa"
    if backend == "flash":
        reason = _flash_reason(q, mask)
        if reason is not None:
            raise RuntimeError(f"attention backend 'flash' cannot run: {reason}; use 'auto' or 'sdpa'")
    return backend


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Attention over q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects q/k/v shaped (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[-2] < q.shape[-2] and causal:
        raise ValueError(f"causal attention needs Lk >= Lq; got Lq={q.shape[-2]}, Lk={k.shape[-2]}")
    name = resolve_backend(backend, q, mask)
    if name == "flash":
        return _flash(q, k, v, causal, dropout_p)
    if name == "sdpa":
        return _sdpa(q, k, v, causal, mask, dropout_p)
    return _math(q, k, v, _merge_masks(q, k, causal, mask), dropout_p)


# ----------------------------------------------------------------------------- KV-cache attention
@contextlib.contextmanager
def masked_cache_attention() -> Iterator[None]:
    """Inside: ``cache_attention`` takes the reference path (the whole static cache under an
    explicit mask), the one the fast paths are tested and benchmarked against."""
    _masked_cache.append(True)
    try:
        yield
    finally:
        _masked_cache.pop()


def host_span(pos: Tensor) -> Optional[tuple[int, int]]:
    """(first, count) when ``pos`` holds consecutive positions and lives on the host (reading it
    costs no device sync); None otherwise, and always while torch.compile traces (fixed shapes)."""
    if pos.device.type != "cpu" or pos.dim() != 1 or torch.compiler.is_compiling():
        return None
    p = pos.tolist()
    return (p[0], len(p)) if p and p == list(range(p[0], p[0] + len(p))) else None


def cache_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: Tensor,
    *,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Queries q (B, H, L, D) at sequence positions ``pos`` (L,), shared by every row, over a static
    cache k/v (B, H, Lmax, D) that already holds their keys: key j is visible to query i iff
    j <= pos[i]. The numbers of ``attention(q, k, v, mask=arange(Lmax) <= pos[:, None])``, by the
    first path that applies:

    1. flash-attn's ``flash_attn_with_kvcache`` (``cache_seqlens`` = pos[-1] + 1, causal): CUDA,
       fp16/bf16 cache and queries, a device flash-attn has kernels for, one query or consecutive
       host positions; no device sync, safe inside a CUDA graph capture. Not while torch.compile
       traces (the extension call is opaque to it).
    2. consecutive positions on the host (the samplers): the cache cut to its first pos[-1] + 1
       positions, no mask for one query (SDPA's fastest kernels), the causal rule for several.
    3. otherwise (device positions, torch.compile, ``masked_cache_attention()``): the whole cache
       under the explicit mask.
    """
    forced = _masked_cache[-1]
    span = None if forced else host_span(pos)
    if not forced and dropout_p == 0.0 and backend in ("auto", "flash") and (span is not None or q.shape[-2] == 1):
        if _flash_kv_reason(q, k_cache, v_cache) is None:
            return _flash_cache(q, k_cache, v_cache, pos, span)
    if span is not None:
        n = span[0] + span[1]
        k, v = k_cache[:, :, :n].to(q.dtype), v_cache[:, :, :n].to(q.dtype)
        return attention(q, k, v, causal=span[1] > 1, dropout_p=dropout_p, backend=backend)
    mask = torch.arange(k_cache.shape[-2], device=q.device)[None, :] <= pos.to(q.device)[:, None]  # (L, Lmax)
    return attention(q, k_cache.to(q.dtype), v_cache.to(q.dtype), mask=mask, dropout_p=dropout_p, backend=backend)


def _flash_kv_reason(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> Optional[str]:
    """Why ``flash_attn_with_kvcache`` cannot run on these tensors (None when it can)."""
    if _flash_attn_with_kvcache is None or torch.compiler.is_compiling():
        return "flash_attn_with_kvcache is not available here"
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return f"the cache is {k_cache.dtype}, the queries {q.dtype}"
    return _flash_reason(q, None)


def _flash_cache(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, span: Optional[tuple[int, int]]) -> Tensor:
    # flash-attn's layout is (B, L, H, D), any strides with a contiguous last dim: the transposed
    # views of our (B, H, L, D) cache are read in place
    b = q.shape[0]
    if span is not None:
        seqlens = torch.full((b,), span[0] + span[1], dtype=torch.int32, device=q.device)
    else:  # one query: the filled length is its position + 1, computed on the device
        seqlens = (pos[-1:].to(q.device) + 1).to(torch.int32).expand(b).contiguous()
    out = _flash_attn_with_kvcache(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                   cache_seqlens=seqlens, causal=True)
    return out.transpose(1, 2)
