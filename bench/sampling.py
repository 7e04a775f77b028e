"""AR sampling throughput: static KV cache vs recomputing the whole sequence every step.

CPU (default, a small model, 256 tokens):
    .venv/bin/python bench/sampling.py
GPU:
    python bench/sampling.py --device cuda --dtype bf16 --model alitok-l --batch 64 --cfg 6.0 --compile

Same model, weights, batch and sampling settings for both paths; prints img/s
(token sequences per second) side by side with the device name.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from system.models.gpt import GPT  # noqa: E402
from system.models.registry import gpt_config, list_models  # noqa: E402
from system.sampling.ar import generate  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# "small": a ~6M-parameter LlamaGen-style model with 256 image tokens, for CPU runs.
SMALL = dict(vocab_size=4096, n_layer=4, dim=256, n_head=8, block_size=256, num_classes=1000, mlp_multiple_of=256)
ANCHORS = "published: RAR-B/L/XL 17.0/15.0/8.3 img/s (A100, fp32, batch 128); AliTok reports 10-17 img/s"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds `fn()` takes on `device` (the device's queue drained before and after)."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help=f"'small' or a preset: {', '.join(list_models())}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cfg", type=float, default=1.0, help="CFG scale (doubles the batch when != 1)")
    ap.add_argument("--schedule", default="constant", choices=["constant", "linear", "power-cosine"])
    ap.add_argument("--tokens", type=int, default=None, help="tokens per image (default: the model's sequence)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU)")
    ap.add_argument("--skip-recompute", action="store_true", help="only time the KV-cache path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (1 is steadier on a shared machine)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    cfg = gpt_config("debug-tiny", **SMALL) if a.model == "small" else gpt_config(a.model)
    with device:
        model = GPT(cfg)
    torch.nn.init.normal_(model.output.weight, std=0.02)  # zero-init head would sample uniform noise
    model = model.to(DTYPES[a.dtype]).eval()
    n = a.tokens or cfg.seq_len
    labels = torch.randint(0, cfg.num_classes, (a.batch,), device=device)
    kw = dict(cfg_scale=a.cfg, schedule=a.schedule, temperature=1.0, top_k=0, top_p=1.0, seed=a.seed, num_tokens=n)
    decode_fn = None
    if a.compile:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        decode_fn = torch.compile(model.decode_one, mode=mode, fullgraph=True)

    print(f"device: {device_name(device)} | torch {torch.__version__}")
    print(f"model: {a.model} ({model.num_params() / 1e6:.1f}M params, {a.dtype}) | batch {a.batch} | "
          f"{n} tokens | cfg {a.cfg} ({a.schedule}) | compile {a.compile}")
    generate(model, labels, **{**kw, "num_tokens": min(n, 8)}, decode_fn=decode_fn)  # warm-up
    if a.compile:
        generate(model, labels, **kw, decode_fn=decode_fn)
    t_cache = timed(lambda: generate(model, labels, **kw, decode_fn=decode_fn), device)
    res = {"device": device_name(device), "kv_cache_img_s": a.batch / t_cache}
    print(f"kv-cache : {t_cache:8.2f} s  {a.batch / t_cache:9.2f} img/s")
    if not a.skip_recompute:
        t_full = timed(lambda: generate(model, labels, **kw, use_cache=False), device)
        res["recompute_img_s"] = a.batch / t_full
        res["speedup"] = t_full / t_cache
        print(f"recompute: {t_full:8.2f} s  {a.batch / t_full:9.2f} img/s")
        print(f"speed-up : {t_full / t_cache:.1f}x")
    print(ANCHORS)
    return res


if __name__ == "__main__":
    main()
