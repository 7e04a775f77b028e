"""Bytes per rank of one training step under DeepSpeed ZeRO as cluster/engine.py configures it.

Our engines keep fp32 weights (precision bf16 is torch autocast: fp32 master weights, bf16 matmuls)
and torch's AdamW (two fp32 moments). For one engine with P trainable and F frozen parameters on N
ranks (p = P / N, f = (P + F) / N; ZeRO-3 keeps parameters under 1e5 elements whole):

| ZeRO | weights    | gradients (backward .. step) | fp32 master | Adam m, v | EMA (if kept) |
|------|------------|------------------------------|-------------|-----------|---------------|
| 0    | 4 (P + F)  | 4 P                          | -           | 8 P       | 4 (P + F)     |
| 1    | 4 (P + F)  | 4 P (+ 4 p flat at the step) | 4 p         | 8 p       | 4 (P + F)     |
| 2    | 4 (P + F)  | 4 p (+ 4 p flat at the step) | 4 p         | 8 p       | 4 (P + F)     |
| 3    | 4 f        | 4 p                          | 4 p         | 8 p       | 4 f           |

ZeRO 1/2 clone the fp32 partition even when the weights are fp32 (DeepSpeed's
`single_partition_of_fp32_groups`), hence the master column. Gradients and reduce buckets live
from an engine's backward to its step only (phases step one engine at a time), the traced
activation peak (system/plan/trace.py) sits on top of the static states; ZeRO 0/1 hold every
gradient of the phase until its step (the trace's peak with gradients), ZeRO 2/3 reduce them into
their partition through buckets of `reduce_bucket_size` elements (fp32; one per communication
dtype under autocast, doubled with overlap_comm on GPU: DeepSpeed's default 5e8 elements makes that
4-8 GB per engine, set deepspeed.extra.zero_optimization.reduce_bucket_size to shrink it). ZeRO-3
also gathers one layer's weights and gradients plus the prefetch bucket (5e7 elements). At the step
ZeRO 1/2 copy the gradient partition into one flat fp32 tensor (DeepSpeed's step), and AdamW adds
its temporaries: one copy of the optimised tensors with foreach (GPU), two of the largest one with
the single-tensor loop (CPU). Measured on CPU (tests/cluster/test_plan_memory.py) the step is the
peak of a small-batch run: within 7% of this model.
Frozen helpers (teachers, LPIPS, VAE) and buffers are whole on every rank. CPU optimizer offload
moves master, moments and the gradient partition to host memory.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from system.plan.trace import StepTrace

GiB = 2**30


@dataclass(frozen=True)
class ZeroSetting:
    """The memory-relevant part of a job's DeepSpeed config on its device."""

    stage: int
    world_size: int
    precision: str  # "bf16" | "fp32" (auto resolved)
    on_gpu: bool
    grad_accum: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    reduce_bucket: int = 0  # elements; 0: DeepSpeed's default on GPU (5e8), ours on CPU (5e7)
    overlap_comm: bool = True
    prefetch_bucket: int = 50_000_000  # ZeRO-3 stage3_prefetch_bucket_size
    persistence_threshold: int = 100_000  # ZeRO-3: parameters below this many elements stay whole

    @classmethod
    def of(cls, exp: Any, world_size: int | None = None, stage: int | None = None) -> "ZeroSetting":
        """From an experiment (deepspeed, optim, cluster sections); as cluster/engine.py builds it."""
        ds = exp.deepspeed
        on_gpu = exp.cluster.device != "cpu"
        precision = ("bf16" if on_gpu else "fp32") if ds.precision == "auto" else ds.precision
        zero = dict((ds.extra or {}).get("zero_optimization", {}))
        return cls(stage=int(ds.zero_stage if stage is None else stage),
                   world_size=int(exp.cluster.num_workers if world_size is None else world_size), precision=precision,
                   on_gpu=on_gpu, grad_accum=int(exp.optim.grad_accum), offload_optimizer=bool(ds.offload_optimizer),
                   offload_params=bool(ds.offload_params),
                   reduce_bucket=int(zero.get("reduce_bucket_size", 5e8 if on_gpu else 5e7)),
                   overlap_comm=bool(zero.get("overlap_comm", on_gpu)),
                   prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", 5e7)),
                   persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 1e5)))


@dataclass
class Memory:
    """Bytes per rank (module doc). `total` = max(forward/backward peak, optimizer-step peak)."""

    weights: int
    gradients: int
    master: int
    optimizer: int
    ema: int
    frozen: int
    buffers: int
    comm: int
    activations: int
    step_transient: int
    forward_backward_peak: int
    step_peak: int
    total: int
    host_bytes: int  # states offloaded to CPU memory (offload_optimizer / offload_params)

    def as_gb(self) -> dict[str, float]:
        return {k: round(v / GiB, 3) for k, v in asdict(self).items()}


def _part(n: float, world: int) -> int:
    return int(math.ceil(n / world))


def rank_memory(trace: StepTrace, z: ZeroSetting) -> Memory:
    """The memory model of the module doc for the traced step `trace` under `z`."""
    n, s = z.world_size, z.stage
    weights = master = optim = ema = buffers = host = 0
    kept, flat, comm, temps = [], [], [], []  # per engine (module doc)
    for m in trace.modules.values():
        total, p = m.trainable + m.frozen, m.trainable
        whole = min(m.small, total)
        w_local = whole + _part(total - whole, n) if s == 3 else total
        p_local = p if s == 0 else _part(p, n)
        if s == 3 and z.offload_params:
            host += 4 * w_local
            weights += 4 * m.largest_layer
        else:
            weights += 4 * w_local
        buffers += m.buffer_bytes
        offload = z.offload_optimizer and s >= 1
        if offload:
            host += 16 * p_local  # master, moments, gradient partition
        else:
            master += 4 * p_local if s >= 1 else 0
            optim += 8 * p_local
        ema += 4 * w_local if m.ema else 0
        part = 0 if offload else 4 * p_local
        kept.append(4 * p if s <= 1 else part)  # gradients from backward to the step
        flat.append(part if s in (1, 2) else 0)  # ZeRO 1/2's step: the partition copied into one flat tensor
        per_dtype = m.comm_dtypes if z.precision == "bf16" else 1
        if s in (1, 2):
            comm.append(z.reduce_bucket * 4 * per_dtype * (2 if z.overlap_comm else 1))
        elif s == 3:  # a bucket per dtype (bf16 2 bytes, fp32 4) + a gathered layer (weights, gradients) + prefetch
            comm.append(z.reduce_bucket * (6 if per_dtype > 1 else 4) + 8 * m.largest_layer + 4 * min(z.prefetch_bucket, total))
        else:
            comm.append(0)
        # AdamW's temporaries: foreach on GPU one copy of the optimised tensors (sqrt of the second
        # moment), the single-tensor loop on CPU two of the largest one (sqrt, then its quotient);
        # ZeRO >= 1 optimises one flat partition; ZeRO-0 also flattens its gradients to all-reduce
        if offload:
            temp = 0
        elif s == 0:
            temp = 4 * p if z.on_gpu else 8 * min(m.largest_layer, p)
        else:
            temp = (4 if z.on_gpu else 8) * p_local
        temps.append(temp + (4 * min(p, 500_000_000) if s == 0 else 0))
    accum = z.grad_accum > 1  # gradients kept across micro-batches
    static = weights + master + optim + ema + trace.frozen_bytes + buffers + (sum(kept) if accum else 0)
    acts = trace.peak_with_grads if (s <= 1 and not accum) else trace.activation_peak
    during = [c + (k if s >= 2 and not accum else 0) for c, k in zip(comm, kept)]
    at_step = [(0 if accum else k) + f + t for k, f, t in zip(kept, flat, temps)]
    fb = static + acts + max(during, default=0)
    step = static + max(at_step, default=0)
    grads = max((k + f for k, f in zip(kept, flat)), default=0) + (sum(kept) - max(kept, default=0) if accum else 0)
    return Memory(weights=weights, gradients=grads, master=master, optimizer=optim, ema=ema, frozen=trace.frozen_bytes,
                  buffers=buffers, comm=max(comm, default=0), activations=acts, step_transient=max(temps, default=0),
                  forward_backward_peak=fb, step_peak=step, total=max(fb, step), host_bytes=host)


def model_state_bytes(trainable: int, frozen: int, z: ZeroSetting, ema: bool = False) -> int:
    """Weights + gradients + fp32 master + Adam moments (+ EMA) per rank for one engine, without
    buffers, buckets or activations: the quantity DeepSpeed's `estimate_zero*_model_states_mem_needs`
    estimate (they assume fp16 weights: see tests/cluster/test_plan_memory.py)."""
    n, s, total = z.world_size, z.stage, trainable + frozen
    w = 4 * (_part(total, n) if s == 3 else total)
    g = 4 * (trainable if s <= 1 else _part(trainable, n))
    opt = 8 * (trainable if s == 0 else _part(trainable, n)) + (4 * _part(trainable, n) if s >= 1 else 0)
    return w + g + opt + (w if ema else 0)


def checkpoint_bytes(trace: StepTrace, z: ZeroSetting) -> int:
    """What one committed checkpoint holds (cluster/checkpoint.py + DeepSpeed's files): the module
    weights (ZeRO 0-2: rank 0's model file; ZeRO-3 keeps them only as the fp32 partitions), the
    optimizer (ZeRO 0: Adam moments; 1-3: fp32 partitions + moments), buffers and each EMA."""
    out = 0
    for m in trace.modules.values():
        total = m.trainable + m.frozen
        out += m.buffer_bytes + (4 * total if z.stage < 3 else 0)
        out += 8 * m.trainable if z.stage == 0 else 12 * m.trainable
        out += 4 * total if m.ema else 0
    return out
