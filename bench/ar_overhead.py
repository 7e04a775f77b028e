"""Overhead of the distributed path for AR training on tokens: the same small GPT (system.methods.ar,
next-token) and global batch trained
(a) through Ray Train + DeepSpeed (the one rank loop via cluster.training.run_training, N CPU
workers, gloo) and
(b) in a plain single-process PyTorch loop (bench/overhead.py's `PlainLoop`: the same `ARMethod.step`,
AdamW groups and clipping),
in one run, timed alike (bench/overhead.py). Tokens come from memory on both sides (`--data memory`:
training throughput only) or from a token shard set written to a temporary folder and read by the
token shard reader on both sides (`--data shards`).

    python bench/ar_overhead.py [--workers 2] [--global-batch 32] [--seq-len 64] [--steps 60] [--zero 2] [--data memory]

Prints steps/s and tokens/s of both and their ratio (goal on CPU: >= 0.8x per token) with the load
average (the machine may be shared: quote the load with the figures).
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.overhead import (MemoryBatches, MemorySource, PlainLoop, bench_config_args, compare,  # noqa: E402
                            distributed_windows, parse_args, plain_windows)
from system.data.sources import TokenSpec  # noqa: E402
from system.methods.ar import ARMethod  # noqa: E402
from system.methods.base import DataSpec  # noqa: E402

CLASSES = 10


def random_tokens(seq_len: int, vocab: int, batch: int, seed: int) -> list[dict]:
    """16 fixed batches of random token sequences and labels (a rank's in-memory data)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, vocab, (16, batch, seq_len), generator=g)
    labels = torch.randint(0, CLASSES, (16, batch), generator=g)
    return [{"codes": c, "label": y, "key": []} for c, y in zip(codes, labels)]


def data_spec(a) -> DataSpec:
    return DataSpec(num_classes=CLASSES, tokens=TokenSpec(a.seq_len, a.vocab))


def method_args(a) -> list[str]:
    """The GPT (preset debug-tiny resized by the flags) as `key=value` settings."""
    flow = "{" + f"n_layer: {a.layers}, dim: {a.dim}, n_head: {a.heads}, rope: 1d" + "}"
    return ["method.model=debug-tiny", f"method.overrides={flow}", "method.ema_decay=0.0", "method.class_dropout=0.1"]


def write_tokens(folder: str, a) -> str:
    from system.data.tokens import write_token_set

    n = a.global_batch * 16
    rng = np.random.default_rng(0)
    write_token_set(folder, rng.integers(0, a.vocab, (n, a.seq_len)), rng.integers(0, CLASSES, n), a.vocab, num_shards=4)
    return folder


def experiment(a, shards: str | None, storage: str, workers: int):
    """The run's config (the plain loop reads its optimizer settings from it too)."""
    from system.config import ARExperiment, load_config

    return load_config(ARExperiment, [
        *bench_config_args(workers, a.steps, a.warmup, a.zero, storage), f"data.url={shards or 'unused'}",
        f"data.batch_size={a.global_batch // workers}", "optim.lr=1e-4", "optim.min_lr=1e-4",
        "optim.schedule=constant", "optim.grad_clip=1.0", *method_args(a)])


def plain_loop(a, threads: int, shards: str | None) -> list[float]:
    """Seconds per step of the rank loop's arithmetic in one process (`ARMethod.step` on the global batch)."""
    torch.manual_seed(0)
    exp = experiment(a, shards, "unused", 1)
    loop = PlainLoop(ARMethod(exp.method, data_spec(a)), exp.optim, exp.train.max_steps)
    if shards:
        from system.data.stream import TokenShardReader

        source = TokenShardReader(shards, rank=0, world_size=1, batch_size=a.global_batch, num_workers=0, seed=0)
    else:
        source = MemoryBatches(random_tokens(a.seq_len, a.vocab, a.global_batch, 0))
    it = iter(source)
    return plain_windows(lambda i: loop.step(next(it)), a.steps, a.warmup, threads)


def distributed(a, shards: str | None) -> list[float]:
    from cluster.training import resolve_job

    def build(storage: str):
        exp = experiment(a, shards, storage, a.workers)
        memory = MemorySource(data_spec(a), partial(random_tokens, a.seq_len, a.vocab))
        return exp, resolve_job(exp, source=None if shards else memory)  # shards: the method's own token source

    return distributed_windows(build, a.global_batch, a.warmup)


def main() -> None:
    def add(ap) -> None:
        ap.add_argument("--seq-len", type=int, default=64)
        ap.add_argument("--vocab", type=int, default=1024)
        ap.add_argument("--layers", type=int, default=4)
        ap.add_argument("--dim", type=int, default=128)
        ap.add_argument("--heads", type=int, default=4)
        ap.add_argument("--data", choices=["memory", "shards"], default="memory")

    a = parse_args(__doc__, add)
    with tempfile.TemporaryDirectory() as d:
        shards = write_tokens(os.path.join(d, "tokens"), a) if a.data == "shards" else None
        params = ARMethod(experiment(a, shards, "unused", 1).method, data_spec(a))
        res = compare(lambda t: plain_loop(a, t, shards), lambda: distributed(a, shards), workers=a.workers, zero=a.zero,
                      per_step=a.global_batch * a.seq_len, unit="tokens", steps=a.steps, warmup=a.warmup,
                      model=f"GPT {a.layers}x{a.dim} ({params.flops_per_token / 1e6:.1f} MFLOP/token), {a.seq_len} tokens of "
                            f"{a.vocab}, global batch {a.global_batch}, data from {a.data}")
    assert math.isfinite(res["ratio"])


if __name__ == "__main__":
    main()
