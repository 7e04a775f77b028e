"""Overhead of the distributed path for AR training on tokens: the same small GPT (system.methods.ar,
next-token) and global batch trained
(a) through Ray Train + DeepSpeed (the one rank loop via cluster.train_pool.run_training, N CPU
workers, gloo) and
(b) in a plain single-process PyTorch loop (AdamW, grad clipping, the same `ARMethod.step`),
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
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.overhead import bench_config_args, compare, distributed_windows, parse_args, plain_windows  # noqa: E402
from system.config import ARConfig  # noqa: E402
from system.data.source import BatchSource  # noqa: E402
from system.data.sources import TokenShards, TokenSpec  # noqa: E402
from system.methods.ar import ARMethod  # noqa: E402
from system.methods.base import DataSpec  # noqa: E402

CLASSES = 10


class RandomTokens(BatchSource):
    """Endless in-memory token batches (16 fixed ones in turn), with the batch-source state API."""

    def __init__(self, batch: int, seq_len: int, vocab: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.codes = torch.randint(0, vocab, (16, batch, seq_len), generator=g)
        self.labels = torch.randint(0, CLASSES, (16, batch), generator=g)
        self.i = 0

    def __iter__(self):
        while True:
            self.i += 1
            j = self.i % len(self.codes)
            yield {"codes": self.codes[j], "label": self.labels[j], "key": []}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = int(s["i"])


class RandomTokensFactory(TokenShards):
    """The bench's data: random in-memory token sequences (nothing to check or validate)."""

    def __init__(self, seq_len: int, vocab: int):
        self.seq_len, self.vocab = seq_len, vocab

    def check(self, exp) -> None:
        pass

    def resolve(self, exp) -> DataSpec:
        return DataSpec(num_classes=CLASSES, tokens=TokenSpec(self.seq_len, self.vocab))

    def __call__(self, exp, ctx):
        return RandomTokens(exp.data.batch_size, self.seq_len, self.vocab, exp.seed + ctx.rank)

    def validation(self, exp, ctx):
        return None


def method_args(a) -> tuple[ARConfig, list[str]]:
    """The GPT (preset debug-tiny resized by the flags), as a config and as `key=value` settings."""
    over = {"n_layer": a.layers, "dim": a.dim, "n_head": a.heads, "rope": "1d"}
    cfg = ARConfig(model="debug-tiny", overrides=over, ema_decay=0.0, class_dropout=0.1)
    flow = "{" + ", ".join(f"{k}: {v}" for k, v in over.items()) + "}"
    return cfg, ["method.model=debug-tiny", f"method.overrides={flow}", "method.ema_decay=0.0", "method.class_dropout=0.1"]


def write_tokens(folder: str, a) -> str:
    from system.data.tokens import write_token_set

    n = a.global_batch * 16
    rng = np.random.default_rng(0)
    write_token_set(folder, rng.integers(0, a.vocab, (n, a.seq_len)), rng.integers(0, CLASSES, n), a.vocab, num_shards=4)
    return folder


def plain_loop(a, threads: int, shards: str | None) -> list[float]:
    """Seconds per step of a single-process loop: `ARMethod.step` on the global batch, AdamW, clip."""
    torch.manual_seed(0)
    cfg, _ = method_args(a)
    m = ARMethod(cfg, DataSpec(num_classes=CLASSES, tokens=TokenSpec(a.seq_len, a.vocab)))
    model = m.modules()["ar"].module
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    if shards:
        from system.data.stream import TokenShardReader

        source = TokenShardReader(shards, rank=0, world_size=1, batch_size=a.global_batch, num_workers=0, seed=0)
    else:
        source = RandomTokens(a.global_batch, a.seq_len, a.vocab, 0)
    it = iter(source)

    def step(i: int) -> None:
        out = m.step("ar", {"ar": model}, next(it), i, {})
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return plain_windows(step, a.steps, a.warmup, threads)


def distributed(a, shards: str | None) -> list[float]:
    from cluster.job import TrainJob
    from cluster.training import resolve_job
    from system.config import ARExperiment, load_config

    def build(storage: str):
        _, margs = method_args(a)
        exp = load_config(ARExperiment, [
            *bench_config_args(a.workers, a.steps, a.warmup, a.zero, storage), f"data.url={shards or 'unused'}",
            f"data.batch_size={a.global_batch // a.workers}", "data.num_workers=0", "optim.lr=1e-4", "optim.min_lr=1e-4",
            "optim.schedule=constant", "optim.grad_clip=1.0", *margs])
        if shards:
            return exp, resolve_job(exp)
        data = DataSpec(num_classes=CLASSES, tokens=TokenSpec(a.seq_len, a.vocab))
        return exp, TrainJob(method=ARMethod, data=data, source=RandomTokensFactory(a.seq_len, a.vocab),
                             micro_batch_size=exp.data.batch_size)

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
        params = ARMethod(method_args(a)[0], DataSpec(num_classes=CLASSES, tokens=TokenSpec(a.seq_len, a.vocab)))
        res = compare(lambda t: plain_loop(a, t, shards), lambda: distributed(a, shards), workers=a.workers, zero=a.zero,
                      per_step=a.global_batch * a.seq_len, unit="tokens", steps=a.steps, warmup=a.warmup,
                      model=f"GPT {a.layers}x{a.dim} ({params.flops_per_token / 1e6:.1f} MFLOP/token), {a.seq_len} tokens of "
                            f"{a.vocab}, global batch {a.global_batch}, data from {a.data}")
    assert math.isfinite(res["ratio"])


if __name__ == "__main__":
    main()
