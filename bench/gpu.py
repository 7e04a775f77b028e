"""One-GPU benchmark: AR sampling against the memory roofline, AR training MFU, attention backend
parity, and FID's 2048 x 2048 matrix square root on the device.

    python bench/gpu.py                    # one H100/H200: under 8 minutes
    python bench/gpu.py --json gpu.json    # also write the figures
    python bench/gpu.py --tiny             # seconds, on CPU too: tiny presets, small batches, fp32 (CI)
    python bench/gpu.py --sections sampling --models alitok-l --batches 256 --decode graph,eager

Sections (each independent: one failing prints its error, the others still run, and the exit
status is 1 at the end):
  sampling   img/s of ``system.sampling.ar.generate`` (KV cache, classifier-free guidance, bf16),
             by default with ``BucketedDecoder``: the decode step compiled (torch.compile) and
             replayed as CUDA graphs, reading only the filled part of the KV cache. Next to it: the
             memory roofline (weights read once per step + the KV cache read, bf16, at the HBM
             bandwidth of the device table), the bound of the bytes the timed path really moves,
             and the published anchors (A100/A800, fp32). An image is the model's whole sequence:
             alitok-l 16 prefix + 256 image tokens, llamagen-l 256 (--tokens to change).
  training   forward + backward + AdamW step of alitok-l (bf16 autocast, fp32 master weights,
             dropout as the preset, clip 1.0); MFU from 6 N + 12 L d T FLOPs per token
             (N: parameters used in matmuls) over the bf16 dense peak of the device.
  attention  system/models/attention.py: sdpa (and flash-attn when importable) against math, for
             a training-shaped causal call and a KV-cache decode call; max abs error and time.
  kvcache    the KV-cache decode step as ``generate`` runs it (flash-attn's ``flash_attn_with_kvcache``
             where usable, else SDPA over the filled part of the cache) against the path before it
             (the whole static cache under a mask, ``masked_cache_attention``): max abs difference
             of the logits over a 256-token teacher-forced decode (CFG batch, llamagen-l, bf16) and
             tokens/s of ``generate`` (eager, no CUDA graphs) on each path.
  fid        tr sqrt(S1 S2) of two 2048 x 2048 covariances the way system/eval/fid.py does it on
             the device (float64 eigh) and by Newton-Schulz in float32, against a float64 CPU
             reference (the eigenvalues of S1 S2); error and time.

Timing: CUDA is synchronised before every clock read; warm-up (and compile / graph capture) runs
are excluded from the figures and reported on their own. Devices missing from the table use the
copy bandwidth and matmul throughput measured at the start instead (printed as "measured").
Training FLOPs and the bf16 peaks are those of system/models/flops.py.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.eval_throughput import fake_features  # noqa: E402
from bench.sampling import device_name, sync, timed  # noqa: E402
from system.eval.fid import feature_stats, frechet_distance  # noqa: E402
from system.eval.sqrtm import sqrtm_newton_schulz  # noqa: E402
from system.models.attention import attention, flash_available, flash_device_reason, masked_cache_attention  # noqa: E402
from system.models.flops import gpt_flops_per_token, gpt_matmul_params, peak_flops  # noqa: E402
from system.models.gpt import GPT  # noqa: E402
from system.models.registry import gpt_config  # noqa: E402
from system.sampling.ar import BucketedDecoder, cached_logits, generate  # noqa: E402

SECTIONS = ("sampling", "training", "attention", "kvcache", "fid")
# HBM bandwidth, TB/s nominal, by a substring of the CUDA device name; the first match wins. The
# bf16 dense peaks come from system.models.flops.
HBM_TBPS = (
    ("H200", 4.8),  # ~4.3 TB/s measured copy (REFERENCE.md)
    ("H100 PCIe", 2.0),
    ("H100 NVL", 3.9),
    ("H100", 3.35),  # SXM
    ("H800", 3.35),
    ("A100 80GB PCIe", 1.935),
    ("A100-SXM4-80GB", 2.039),
    ("A100", 1.555),  # 40 GB
    ("A800", 2.039),
    ("L40S", 0.864),
)
# published sampling throughput, one A100/A800, fp32 (AliTok paper; RAR paper, batch 128)
ANCHORS = {"alitok-l": ("AliTok-L", 10.1), "llamagen-l": ("RAR-L", 15.0)}
GOAL_ROOFLINE, GOAL_MFU = 0.50, 0.45
# sampling settings per preset: (cfg scale, schedule, power)
CFG = {"alitok-l": (6.0, "power-cosine", 0.7), "llamagen-l": (2.0, "constant", 1.0)}
TINY = {  # CPU-sized stand-ins: same code paths, milliseconds per step
    "llamagen-tiny": ("debug-tiny", {}),
    "alitok-tiny": ("debug-tiny", dict(rope="mixed", prefix_tokens=4, qk_norm=True, qkv_bias=True)),
}
DECODE_MODES = ("graph", "graph-eager", "compile", "bucketed", "reduce-overhead", "eager")
# what to try next when a decode mode fails (compile or capture errors)
FALLBACK = {"graph": "graph-eager", "graph-eager": "bucketed", "compile": "bucketed", "reduce-overhead": "eager"}


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


# ------------------------------------------------------------------------------------- hardware
@dataclass
class Hardware:
    name: str
    hbm_tbps: float  # for the roofline: the table's nominal figure, else the measured copy
    peak_tflops: float  # for MFU: the bf16 dense peak of system.models.flops, else the measured matmul
    hbm_source: str  # "table" or "measured"
    peak_source: str
    copy_tbps: float  # measured device-to-device copy (read + write)
    matmul_tflops: float  # measured matmul in the benchmark dtype


def probe(device: torch.device, dtype: torch.dtype, tiny: bool) -> Hardware:
    big = device.type == "cuda" and not tiny
    n_copy = (1 << 28) if big else (1 << 22)  # float32 elements
    src = torch.empty(n_copy, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    iters = 10
    copy_s = timed(lambda: [dst.copy_(src) for _ in range(iters)], device)
    del src, dst
    n = 8192 if big else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    mm_s = timed(lambda: [a @ a for _ in range(iters)], device)
    copy_tbps, mm_tflops = 2 * 4 * n_copy * iters / copy_s / 1e12, 2 * n**3 * iters / mm_s / 1e12
    name = device_name(device)
    tbps = next((v for key, v in HBM_TBPS if key in name), None) if device.type == "cuda" else None
    peak = peak_flops(name) if device.type == "cuda" else None
    return Hardware(name, tbps or copy_tbps, peak / 1e12 if peak else mm_tflops, "table" if tbps else "measured",
                    "table" if peak else "measured", copy_tbps, mm_tflops)


# ------------------------------------------------------------------------------------- sampling
def generation_bytes(cfg, rows: int, n_tokens: int, elem_bytes: int, bucket: int | None) -> float:
    """Bytes read from memory to generate ``n_tokens`` for ``rows`` sequences (CFG rows included):
    every pass (prefill + n_tokens - 1 decode steps) reads the weights once (those used in matmuls:
    embedding rows are gathered, not read whole) and the keys/values of the positions it attends
    to. bucket None: only the filled positions (the roofline); 0: the whole static cache
    (``decode_one``); b > 0: the filled positions rounded up to a multiple of b (BucketedDecoder)."""
    weights = gpt_matmul_params(cfg) * elem_bytes
    per_pos = 2 * cfg.n_layer * rows * cfg.dim * elem_bytes  # k and v of one position, all layers
    max_len = cfg.cls_token_num + n_tokens
    keys = [cfg.cls_token_num] + [cfg.cls_token_num + i + 1 for i in range(n_tokens - 1)]
    if bucket == 0:
        keys = [max_len] * n_tokens
    elif bucket:
        keys = [min(max_len, -(-k // bucket) * bucket) for k in keys]
    return n_tokens * weights + per_pos * sum(keys)


def make_decoder(model: GPT, mode: str, bucket: int):
    if mode == "eager":
        return None  # generate's default: model.decode_one over the whole cache
    if mode == "reduce-overhead":
        return torch.compile(model.decode_one, mode="reduce-overhead", fullgraph=True)
    compile_mode = "default" if mode in ("graph", "compile") else None
    return BucketedDecoder(model, bucket, compile_mode=compile_mode, cuda_graph=mode in ("graph", "graph-eager"))


def time_generation(model: GPT, labels, kw: dict, mode: str, decoders: dict, a, device) -> tuple[float | None, list[float]]:
    """(first generation's seconds, compile and capture included, or None; ``a.repeats`` timed ones)."""
    if mode not in decoders:
        decoders[mode] = make_decoder(model, mode, a.bucket)
    fn = decoders[mode]

    def run():
        return generate(model, labels, **kw, decode_fn=fn)

    first = None
    if mode == "eager":  # nothing to compile or capture: a short warm-up, not reported
        generate(model, labels, **{**kw, "num_tokens": min(kw["num_tokens"], 8)})
    else:
        first = timed(run, device)
    return first, [timed(run, device) for _ in range(a.repeats)]


def sampling_models(a) -> list[tuple[str, str, dict]]:
    if a.tiny:
        return [(name, *TINY[name]) for name in a.models]
    return [(name, name, {}) for name in a.models]


def bench_sampling(a, hw: Hardware, device: torch.device, dtype: torch.dtype) -> tuple[list[dict], list[tuple]]:
    elem = torch.finfo(dtype).bits // 8
    rows, table = [], []
    for name, preset, overrides in sampling_models(a):
        torch.manual_seed(0)
        with device:
            model = GPT(gpt_config(preset, **overrides))
        torch.nn.init.normal_(model.output.weight, std=0.02)  # a zero-init head would sample uniform noise
        model = model.to(dtype).eval()
        cfg = model.cfg
        n = a.tokens or cfg.seq_len
        scale, schedule, power = CFG.get(name, (4.0, "constant", 1.0))
        kw = dict(cfg_scale=scale, schedule=schedule, cfg_power=power, temperature=1.0, num_tokens=n, seed=0)
        print(f"\n{name}: {model.num_params() / 1e6:.1f}M params, {n} tokens/image ({cfg.prefix_tokens} prefix + "
              f"{n - cfg.prefix_tokens} image), CFG {scale} {schedule}, {str(dtype).replace('torch.', '')}, "
              f"KV cache, bucket {a.bucket}")
        runs = [(mode, b) for mode in a.decode for b in a.batches]
        if a.baseline and "eager" not in a.decode:
            runs.append(("eager", min(a.batches)))
        decoders: dict[str, object] = {}
        replaced: dict[str, str] = {}  # mode -> the fallback that ran instead
        for requested, batch in runs:
            labels = torch.randint(0, cfg.num_classes, (batch,), device=device)
            mode = replaced.get(requested, requested)
            while True:  # walk the fallback chain when a mode cannot compile / capture here
                try:
                    first, times = time_generation(model, labels, kw, mode, decoders, a, device)
                    break
                except Exception as e:  # noqa: BLE001 - report and fall back
                    nxt = FALLBACK.get(mode)
                    print(f"  {mode} b={batch}: failed ({error_text(e)}); " + (f"falling back to {nxt}" if nxt else "no fallback"))
                    decoders.pop(mode, None)
                    if nxt is None:
                        raise
                    mode = replaced[requested] = nxt
            t = statistics.median(times)
            img_s = batch / t
            roof_s = generation_bytes(cfg, 2 * batch, n, elem, None) / (hw.hbm_tbps * 1e12)
            path_bucket = a.bucket if mode in ("graph", "graph-eager", "compile", "bucketed") else 0
            path_s = generation_bytes(cfg, 2 * batch, n, elem, path_bucket) / (hw.hbm_tbps * 1e12)
            anchor = ANCHORS.get(name)
            row = dict(model=name, batch=batch, tokens=n, decode=mode, requested=requested, seconds=t, img_s=img_s, ms_per_step=1e3 * t / n,
                       first_run_s=first, compile_capture_s=None if first is None else max(first - t, 0.0),
                       roofline_img_s=batch / roof_s, roofline_frac=roof_s / t, path_bound_img_s=batch / path_s,
                       roofline_frac_at_copy_bw=roof_s * hw.hbm_tbps / hw.copy_tbps / t,
                       anchor=anchor[0] if anchor else None, anchor_img_s=anchor[1] if anchor else None)
            rows.append(row)
            first_txt = "" if first is None else f" | first run {first:.1f} s (compile/capture {row['compile_capture_s']:.1f} s)"
            anchor_txt = f" | {anchor[0]} {anchor[1]} img/s (A100 fp32): {img_s / anchor[1]:.1f}x" if anchor else ""
            print(f"  {mode:<15} b={batch:<4} {t:7.3f} s  {img_s:9.1f} img/s  {row['ms_per_step']:6.2f} ms/step | "
                  f"roofline {row['roofline_img_s']:.0f} img/s -> {100 * row['roofline_frac']:.1f}% "
                  f"(goal >= {100 * GOAL_ROOFLINE:.0f}%; {100 * row['roofline_frac_at_copy_bw']:.1f}% at the measured "
                  f"copy bandwidth) | bound of this path {row['path_bound_img_s']:.0f} img/s"
                  f"{anchor_txt}{first_txt}")
            goal = "ok" if row["roofline_frac"] >= GOAL_ROOFLINE else "below goal"
            ref = f"roofline {row['roofline_img_s']:.0f} ({100 * row['roofline_frac']:.0f}%)"
            if anchor:
                ref += f"; {anchor[0]} {anchor[1]}"
            label = mode if mode == requested else f"{mode} (for {requested})"
            table.append(("sampling", f"{name} b{batch} {label}", f"{img_s:.1f} img/s", ref,
                          f">= {100 * GOAL_ROOFLINE:.0f}% roofline", goal))
        for dec in decoders.values():
            if isinstance(dec, BucketedDecoder):
                dec.release()
        del model, decoders
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, table


# ------------------------------------------------------------------------------------- training
def bench_training(a, hw: Hardware, device: torch.device, dtype: torch.dtype) -> tuple[dict, list[tuple]]:
    name, preset, overrides = ("alitok-tiny", *TINY["alitok-tiny"]) if a.tiny else ("alitok-l", "alitok-l", {})
    torch.manual_seed(0)
    with device:
        model = GPT(gpt_config(preset, **overrides)).train()  # fp32 master weights, preset dropout
    cfg = model.cfg
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.96), weight_decay=0.03, fused=fused)
    batch, seq = a.train_batch, cfg.seq_len
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device)
    amp = dtype != torch.float32

    def step(fwd) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            _, loss = fwd(tokens, labels, targets=tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    fwd, compiled = model, False
    if a.compile:
        try:
            fwd = torch.compile(model)
            warm_s = timed(lambda: [step(fwd) for _ in range(a.train_warmup)], device)
            compiled = True
        except Exception as e:  # noqa: BLE001
            print(f"  torch.compile failed ({error_text(e)}); eager instead")
            fwd, why = model, f" (compile failed: {error_text(e)[:80]})"
    why = "" if a.compile else f" (compile off: {'CPU' if device.type == 'cpu' else '--tiny' if a.tiny else '--no-compile'})"
    if not compiled:
        warm_s = timed(lambda: [step(fwd) for _ in range(a.train_warmup)], device)
    t = timed(lambda: [step(fwd) for _ in range(a.train_steps)], device)
    n_dense, flops_tok = gpt_matmul_params(cfg), gpt_flops_per_token(cfg)
    tok_s = batch * seq * a.train_steps / t
    mfu = tok_s * flops_tok / (hw.peak_tflops * 1e12)
    res = dict(model=name, batch=batch, seq=seq, dtype=str(dtype).replace("torch.", ""), compiled=compiled,
               params_dense=n_dense, flops_per_token=flops_tok, step_s=t / a.train_steps, tokens_per_s=tok_s,
               images_per_s=batch * a.train_steps / t, warmup_s=warm_s, warmup_steps=a.train_warmup,
               peak_tflops=hw.peak_tflops, peak_source=hw.peak_source, achieved_tflops=tok_s * flops_tok / 1e12, mfu=mfu)
    print(f"\n{name} train step (fwd + bwd + clip + AdamW{' fused' if fused else ''}), batch {batch} x {seq} tokens, "
          f"{res['dtype']}{' autocast' if amp else ''}, compiled {compiled}{why}: {1e3 * res['step_s']:.1f} ms/step, "
          f"{tok_s:,.0f} tok/s, {res['images_per_s']:.1f} img/s")
    print(f"  FLOPs/token 6N + 12 L d T = 6 x {n_dense / 1e6:.1f}M + 12 x {cfg.n_layer} x {cfg.dim} x {seq} = "
          f"{flops_tok / 1e9:.3g} GFLOP -> {res['achieved_tflops']:.3g} TFLOP/s of {hw.peak_tflops:.3g} "
          f"({hw.peak_source}) = MFU {100 * mfu:.1f}% (goal >= {100 * GOAL_MFU:.0f}%) | warm-up {warm_s:.1f} s "
          f"({a.train_warmup} steps{', incl. compile' if compiled else ''})")
    table = [("training", f"{name} b{batch} MFU", f"{100 * mfu:.1f}%", f"{res['achieved_tflops']:.3g} of "
              f"{hw.peak_tflops:.3g} TFLOP/s", f">= {100 * GOAL_MFU:.0f}%", "ok" if mfu >= GOAL_MFU else "below goal")]
    return res, table


# ------------------------------------------------------------------------------------ attention
def _time_call(fn, device: torch.device, iters: int) -> float:
    fn()
    fn()
    return timed(lambda: [fn() for _ in range(iters)], device) / iters


def bench_attention(a, device: torch.device, dtype: torch.dtype) -> tuple[list[dict], list[tuple]]:
    if a.tiny:
        b, h, seq, hd, rows = 2, 4, 17, 16, 4
    else:  # alitok-l shapes: a training micro-batch, and a batch-256 CFG decode step
        b, h, seq, hd, rows = 16, 16, 273, 64, 512
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
    cases = [
        ("train causal", (rnd(b, h, seq, hd), rnd(b, h, seq, hd), rnd(b, h, seq, hd)), dict(causal=True)),
        ("decode masked", (rnd(rows, h, 1, hd), rnd(rows, h, seq, hd), rnd(rows, h, seq, hd)),
         dict(mask=torch.arange(seq, device=device)[None, :] <= seq // 2)),
    ]
    backends = ["sdpa", "math"] + (["flash"] if flash_available() and device.type == "cuda" and dtype != torch.float32 else [])
    tol = 1e-4 if dtype == torch.float32 else 5e-2  # outputs are O(1): a few ulps of the dtype
    rows_out, table = [], []
    print(f"\nattention ({str(dtype).replace('torch.', '')}): errors against backend 'math' and a float64 math reference")
    for case, (q, k, v), kw in cases:
        ref64 = attention(q.double(), k.double(), v.double(), backend="math", **kw)
        outs, ms = {}, {}
        for be in backends:
            if be == "flash" and "mask" in kw:
                continue  # flash-attn takes no explicit mask
            outs[be] = attention(q, k, v, backend=be, **kw)
            ms[be] = 1e3 * _time_call(lambda: attention(q, k, v, backend=be, **kw), device, 20)  # noqa: B023
        for be, out in outs.items():
            err_math = float((out.double() - outs["math"].double()).abs().max())
            err64 = float((out.double() - ref64).abs().max())
            rows_out.append(dict(case=case, backend=be, shape_q=list(q.shape), shape_k=list(k.shape), ms=ms[be],
                                 max_abs_err_vs_math=err_math, max_abs_err_vs_fp64=err64))
            print(f"  {case:<14} {be:<6} q{tuple(q.shape)} k{tuple(k.shape)}: {ms[be]:8.3f} ms  "
                  f"max|x - math| {err_math:.2e}  max|x - fp64| {err64:.2e}")
            if be != "math":
                table.append(("attention", f"{case}: {be} vs math", f"{err_math:.1e}",
                              f"{ms[be]:.3f} ms (math {ms['math']:.3f} ms)", f"< {tol:g}",
                              "ok" if err_math < tol else "large error"))
    return rows_out, table


# -------------------------------------------------------------------------------------- kvcache
def kv_cache_path(device: torch.device, dtype: torch.dtype) -> str:
    """The path ``cache_attention`` takes for an eager decode step on this device and dtype."""
    if device.type == "cuda" and flash_available() and dtype in (torch.float16, torch.bfloat16):
        reason = flash_device_reason(device.index)
        return "flash_attn_with_kvcache" if reason is None else f"sdpa filled part (no flash: {reason[:60]})"
    return "sdpa filled part"


def bench_kvcache(a, device: torch.device, dtype: torch.dtype) -> tuple[list[dict], list[tuple]]:
    name, preset, overrides = ("llamagen-tiny", *TINY["llamagen-tiny"]) if a.tiny else ("llamagen-l", "llamagen-l", {})
    batch = 2 if a.tiny else 32
    torch.manual_seed(0)
    with device:
        model = GPT(gpt_config(preset, **overrides))
    torch.nn.init.normal_(model.output.weight, std=0.02)  # a zero-init head gives zero logits
    model = model.to(dtype).eval()
    cfg = model.cfg
    n = cfg.seq_len
    g = torch.Generator(device=device).manual_seed(0)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device, generator=g)
    tokens = torch.randint(0, cfg.vocab_size, (batch, n), device=device, generator=g)
    lab2, tok2 = torch.cat([labels, torch.full_like(labels, cfg.num_classes)]), torch.cat([tokens, tokens])
    fast = cached_logits(model, lab2, tok2).float()
    with masked_cache_attention():
        ref = cached_logits(model, lab2, tok2).float()
    diff, scale = float((fast - ref).abs().max()), float(ref.abs().max())
    kw = dict(cfg_scale=4.0, temperature=1.0, seed=0)
    path = kv_cache_path(device, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # relative to the largest logit
    rows, table = [], []
    print(f"\nKV-cache decode, {name} ({model.num_params() / 1e6:.1f}M params), {n} tokens, batch {batch} x 2 (CFG), "
          f"{str(dtype).replace('torch.', '')}: max |logits(path) - logits(masked)| {diff:.3g} (largest logit {scale:.3g})")
    speed = {}
    for label, ctx in ((path, contextlib.nullcontext), ("masked (before)", masked_cache_attention)):
        with ctx():
            generate(model, labels, **{**kw, "num_tokens": min(n, 8)})  # warm-up
            t = statistics.median([timed(lambda: generate(model, labels, **kw), device) for _ in range(a.repeats)])
        speed[label] = batch * n / t
        rows.append(dict(model=name, path=label, batch=batch, tokens=n, seconds=t, tokens_per_s=speed[label],
                         max_abs_diff_logits=diff, max_abs_logit=scale))
        print(f"  {label:<40} {t:7.3f} s  {speed[label]:10.0f} tokens/s")
    table.append(("kvcache", f"{name} b{batch} {path[:24]} vs masked", f"|dlogits| {diff:.1e}",
                  f"{speed[path]:.0f} vs {speed['masked (before)']:.0f} tok/s", f"< {tol:g} x {scale:.3g}",
                  "ok" if diff <= tol * max(scale, 1.0) else "large error"))
    del model
    return rows, table


# ------------------------------------------------------------------------------------------ fid
def bench_fid(a, device: torch.device) -> tuple[list[dict], list[tuple]]:
    d, n = (64, 256) if a.tiny else (2048, 4096)
    f1, f2 = fake_features(n, d, 0, 0.0), fake_features(n, d, 1, 0.05)
    (mu1, s1), (mu2, s2) = feature_stats(f1), feature_stats(f2)
    base = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2))
    t = time.perf_counter()
    ev = np.linalg.eigvals(s1 @ s2)  # float64, CPU: tr sqrt(S1 S2) = sum of sqrt(eigenvalues)
    tr_ref = float(np.sqrt(np.clip(ev.real, 0, None)).sum())
    ref_s = time.perf_counter() - t
    fid_ref = base - 2 * tr_ref
    print(f"\nFID sqrtm, {d} x {d} covariances (N={n}): float64 reference (numpy eigvals of S1 S2, CPU) "
          f"FID {fid_ref:.6f} in {ref_s:.1f} s (scipy sqrtm on CPU takes minutes at 2048, REFERENCE.md)")

    def fid_path() -> float:
        return frechet_distance(mu1, s1, mu2, s2, backend="torch", device=device)

    def fid_newton_schulz() -> float:
        prod = torch.from_numpy(s1 @ s2).to(device=device, dtype=torch.float32)
        return base - 2 * float(torch.trace(sqrtm_newton_schulz(prod)))

    paths = [(f"fid.py torch float64 eigh [{device.type}]", fid_path, 1e-6)]  # (label, fn, relative tolerance)
    if device.type == "cuda":
        paths.append(("Newton-Schulz float32 [cuda]", fid_newton_schulz, 1e-3))
    rows, table = [], []
    for label, fn, tol in paths:
        fn()  # warm-up: CUDA context, cuSOLVER / cuBLAS handles
        times, value = [], float("nan")
        for _ in range(3):
            t = time.perf_counter()
            value = fn()
            sync(device)
            times.append(time.perf_counter() - t)
        s = statistics.median(times)
        err = abs(value - fid_ref)
        rows.append(dict(path=label, dim=d, n=n, seconds=s, fid=value, fid_ref=fid_ref, abs_err=err,
                         rel_err=err / abs(fid_ref), ref_seconds=ref_s))
        print(f"  {label:<36} {s:8.3f} s  FID {value:.6f}  |err| {err:.2e} (rel {err / abs(fid_ref):.1e})")
        table.append(("fid", f"{label} {d}x{d}", f"{s:.3f} s", f"|dFID| {err:.1e} vs fp64 ({ref_s:.1f} s CPU)",
                      f"rel < {tol:g}", "ok" if err <= tol * abs(fid_ref) else "large error"))
    return rows, table


# ----------------------------------------------------------------------------------------- main
def finite(x):
    """NaN / inf -> None, recursively, so the JSON stays strict."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny presets, small batches, fp32, no compile (CI, seconds)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--models", default=None, help="sampling presets (default alitok-l,llamagen-l; tiny: *-tiny)")
    ap.add_argument("--batches", default=None, help="sampling batch sizes (default 64,256; tiny 2,4)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per image (default: the model's prefix + image)")
    ap.add_argument("--decode", default=None, help=f"decode modes, comma list of {', '.join(DECODE_MODES)}. graph: "
                    "compiled step + CUDA graphs + bucketed cache reads; graph-eager: the same uncompiled; compile: "
                    "no graphs; bucketed: eager, bucketed; reduce-overhead: torch.compile's own CUDA graphs over the "
                    "whole cache; eager: generate's plain decode_one. Default: graph on CUDA (graph-eager with "
                    "--tiny or --no-compile), bucketed on CPU; modes given here run as given")
    ap.add_argument("--bucket", type=int, default=None, help="KV positions per bucket (default 32; tiny 4)")
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per row (median)")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the eager decode row")
    ap.add_argument("--train-batch", type=int, default=None, help="default 128 (tiny 8)")
    ap.add_argument("--train-steps", type=int, default=None, help="timed steps (default 10; tiny 3)")
    ap.add_argument("--train-warmup", type=int, default=3, help="untimed steps, compile included")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="no torch.compile in the default modes")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 with --tiny on CPU, "
                    "steady on a shared machine; else torch's default)")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    a = ap.parse_args(argv)
    a.device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = a.device.type == "cuda"
    a.compile = a.compile and cuda and not a.tiny
    if a.threads or (a.tiny and not cuda):
        torch.set_num_threads(a.threads or 1)
    a.sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    a.models = a.models.split(",") if a.models else (list(TINY) if a.tiny else ["alitok-l", "llamagen-l"])
    a.batches = [int(b) for b in a.batches.split(",")] if a.batches else ([2, 4] if a.tiny else [64, 256])
    default_decode = ("graph" if a.compile else "graph-eager") if cuda else "bucketed"
    a.decode = a.decode.split(",") if a.decode else [default_decode]
    bad = [m for m in a.decode if m not in DECODE_MODES]
    if bad:
        ap.error(f"unknown decode mode(s) {bad}; choose from {DECODE_MODES}")
    a.bucket = a.bucket if a.bucket is not None else (4 if a.tiny else 32)
    a.train_batch = a.train_batch or (8 if a.tiny else 128)
    a.train_steps = a.train_steps or (3 if a.tiny else 10)
    if a.tiny:
        a.train_warmup = min(a.train_warmup, 1)
        a.repeats = min(a.repeats, 2)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    device = a.device
    dtype = torch.float32 if a.tiny or device.type == "cpu" else torch.bfloat16
    start = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 figures stay fp32
    hw = probe(device, dtype, a.tiny)
    print(f"device: {hw.name} | torch {torch.__version__} | {str(dtype).replace('torch.', '')} | "
          f"compile {'on' if a.compile else 'off (' + ('--tiny' if a.tiny else 'CPU' if device.type == 'cpu' else '--no-compile') + ')'}")
    print(f"  HBM {hw.hbm_tbps:.3g} TB/s ({hw.hbm_source}), peak {hw.peak_tflops:.3g} TFLOP/s ({hw.peak_source}); measured here: "
          f"copy {hw.copy_tbps:.3g} TB/s, matmul {hw.matmul_tflops:.3g} TFLOP/s")
    report = dict(device=hw.name, torch=torch.__version__, tiny=a.tiny, dtype=str(dtype).replace("torch.", ""),
                  compile=a.compile, hardware=asdict(hw), goals=dict(roofline=GOAL_ROOFLINE, mfu=GOAL_MFU),
                  errors={}, elapsed_s={})
    table: list[tuple] = []
    runners = {
        "sampling": lambda: bench_sampling(a, hw, device, dtype),
        "training": lambda: bench_training(a, hw, device, dtype),
        "attention": lambda: bench_attention(a, device, dtype),
        "kvcache": lambda: bench_kvcache(a, device, dtype),
        "fid": lambda: bench_fid(a, device),
    }
    for section in a.sections:
        t = time.perf_counter()
        try:
            report[section], rows = runners[section]()
            table += rows
        except Exception as e:  # noqa: BLE001 - each section is independent
            traceback.print_exc()
            report["errors"][section] = error_text(e)
            print(f"[{section}] FAILED: {error_text(e)}")
            table.append((section, "(failed)", "-", report["errors"][section][:60], "", "ERROR"))
        finally:
            report["elapsed_s"][section] = time.perf_counter() - t
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report["total_s"] = time.perf_counter() - start

    head = ("section", "item", "value", "reference", "goal", "status")
    widths = [max(len(str(r[i])) for r in [head, *table]) for i in range(len(head))]
    print(f"\n== summary: {hw.name}, {report['total_s']:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in report['elapsed_s'].items())}) ==")
    for r in [head, *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(finite(report), fh, indent=2, default=str)
        print(f"wrote {a.json}")
    if report["errors"]:
        print(f"failed sections: {', '.join(report['errors'])}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
