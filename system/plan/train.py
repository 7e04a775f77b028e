"""The plan of one training job at its configured size: build and trace one step with fake tensors
(system/plan/trace.py), then parameters, bytes per rank under its ZeRO stage and world size
(system/plan/memory.py), whether that fits an 80 GB / 141 GB card, FLOPs, time and GPU-hours at a
stated MFU, the checkpoint size, the weight files a real run reads, and, when it does not fit, the
settings that would (each re-evaluated: the memory model for ZeRO stages and ranks, a new trace for
activation checkpointing and smaller micro-batches).

    plan = plan_training(exp, data)          # exp: a typed Experiment, data: its DataSpec
    plan.memory.total, plan.fits, plan.gpu_hours, plan.as_dict()
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from system.data.sources import ActorFedSource, DataSpec
from system.plan.batches import batch_builder
from system.plan.cards import Card, Fit, GiB, card as card_named
from system.plan.memory import Memory, ZeroSetting, checkpoint_bytes, rank_memory
from system.plan.trace import StepTrace, build_fake, trace_step

DEFAULT_MFU = 0.4
FIT_CARDS = ("h100", "h200")


@dataclass
class Suggestion:
    """A setting that changes the plan's memory, and what the memory model says of it."""

    setting: str  # config keys, e.g. "deepspeed.zero_stage=3", "data.batch_size=4 optim.grad_accum=2"
    total_gb: float  # bytes per rank with it
    fits: bool  # on the plan's card


@dataclass
class TrainPlan:
    method: str
    card: str
    mfu: float
    world_size: int
    zero_stage: int
    precision: str
    micro_batch: int  # per rank
    grad_accum: int
    params_trainable: int  # parameters that received a gradient in the traced step
    params_frozen: int  # frozen parameters an op read (helpers, frozen parts of trained modules)
    params_unused: int  # built but never read (still in memory)
    modules: dict[str, dict]  # per trained module (engine): system.plan.trace.ModuleParams
    memory: Memory  # bytes per rank
    fits: list[Fit]
    flops_per_step_rank: float  # one optimiser step (micro-batch x grad_accum), all phases, one rank
    flops_per_step: float  # all ranks
    flops_by_phase: dict[str, float]  # one micro-batch
    flops_check: Optional[dict]  # {"formula", "expected", "ratio"} where system/models/flops.py applies
    step_seconds: float  # at `mfu` of the card's peak
    max_steps: int
    wall_hours: float
    gpu_hours: float
    checkpoint_bytes: int
    weights: list[dict]  # weight sources a real run reads: {what, where, exists}
    suggestions: list[Suggestion] = field(default_factory=list)
    trace_seconds: float = 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["memory_gb"] = self.memory.as_gb()
        return out


def _peak(c: Card, precision: str) -> float:
    return c.bf16_flops if precision == "bf16" else c.bf16_flops / 2  # fp32 matmuls as TF32: half the bf16 rate


def _flops_check(fm: Any, trace: StepTrace, micro: int) -> Optional[dict]:
    """Traced FLOPs against `gpt_flops_per_token` for methods that train one GPT on token sequences."""
    per_token = getattr(fm.method, "flops_per_token", None)
    gpt = getattr(fm.method, "gpt_cfg", None)
    if not per_token or gpt is None:
        return None
    expected = float(per_token) * micro * gpt.seq_len
    return {"formula": "system.models.flops.gpt_flops_per_token x tokens", "expected": expected,
            "ratio": trace.flops / expected}


def checkpointing_key(exp: Any) -> Optional[str]:
    """The config key that switches activation checkpointing on for this method (None: it has none)."""
    m = exp.method
    if hasattr(m, "grad_checkpointing"):
        return "method.grad_checkpointing"
    if hasattr(getattr(m, "model", None), "grad_checkpointing"):
        return "method.model.grad_checkpointing"
    return None


def with_setting(exp: Any, key: str, value: Any) -> Any:
    """A copy of `exp` with the dotted attribute `key` set to `value`."""
    out = copy.deepcopy(exp)
    *path, last = key.split(".")
    node = out
    for p in path:
        node = getattr(node, p)
    setattr(node, last, value)
    return out


@dataclass
class _Traced:
    entry: Any
    fm: Any
    trace: StepTrace


def _trace(exp: Any, data: DataSpec, entry: Any) -> _Traced:
    world = int(exp.cluster.num_workers)
    fm = build_fake(entry.method, exp.method, data, world)
    make = batch_builder(entry.source)(exp, data, fm, world)
    precision = ZeroSetting.of(exp).precision
    trace = trace_step(fm, make, precision, step=max(int(exp.train.max_steps) - 1, 0))
    trace.seconds += fm.seconds
    return _Traced(entry, fm, trace)


def plan_training(exp: Any, data: DataSpec, *, card: str = "h100", mfu: float = DEFAULT_MFU, suggest: bool = True,
                  reserve: Optional[float] = None) -> TrainPlan:
    """The plan of training `exp` (a typed Experiment) on `data` (module doc). `card`: the card the
    time and the suggestions are stated for; `mfu`: the model FLOPs utilisation assumed."""
    from system.methods import registry
    from system.plan.cards import RESERVE

    reserve = RESERVE if reserve is None else reserve
    entry = registry.for_config(exp.method)
    t = _trace(exp, data, entry)
    return _plan(exp, data, t, card_named(card), mfu, reserve, suggest)


def _plan(exp: Any, data: DataSpec, t: _Traced, c: Card, mfu: float, reserve: float, suggest: bool) -> TrainPlan:
    trace = t.trace
    z = ZeroSetting.of(exp)
    mem = rank_memory(trace, z)
    micro = int(exp.data.batch_size) if not isinstance(t.entry.source, ActorFedSource) else \
        int(exp.data.batch_size) // z.world_size
    per_step = trace.flops * z.grad_accum
    seconds = per_step / (_peak(c, z.precision) * mfu)
    steps = int(exp.train.max_steps)
    mods = trace.modules
    trainable = sum(m.used_trainable for m in mods.values())
    frozen = sum(m.used_frozen for m in mods.values()) + trace.frozen_used
    built = sum(m.trainable + m.frozen for m in mods.values()) + trace.frozen_params
    plan = TrainPlan(
        method=t.entry.name, card=c.name, mfu=mfu, world_size=z.world_size, zero_stage=z.stage, precision=z.precision,
        micro_batch=micro, grad_accum=z.grad_accum, params_trainable=trainable, params_frozen=frozen,
        params_unused=built - trainable - frozen, modules={n: asdict(m) for n, m in mods.items()}, memory=mem,
        fits=[Fit.of(card_named(k), mem.total, reserve) for k in FIT_CARDS], flops_per_step_rank=per_step,
        flops_per_step=per_step * z.world_size, flops_by_phase=dict(trace.flops_by_phase),
        flops_check=_flops_check(t.fm, trace, micro), step_seconds=seconds, max_steps=steps,
        wall_hours=seconds * steps / 3600, gpu_hours=seconds * steps * z.world_size / 3600,
        checkpoint_bytes=checkpoint_bytes(trace, z), weights=list(trace.weights), trace_seconds=trace.seconds)
    if suggest and mem.total > c.usable(reserve):
        plan.suggestions = suggestions(exp, data, t, c, reserve)
    return plan


def suggestions(exp: Any, data: DataSpec, t: _Traced, c: Card, reserve: float) -> list[Suggestion]:
    """Settings that change the memory of a plan that does not fit `c`, each re-evaluated (module doc)."""
    usable = c.usable(reserve)
    out: list[Suggestion] = []
    z = ZeroSetting.of(exp)

    now = rank_memory(t.trace, z).total

    def add(setting: str, total: int) -> None:
        if total < now:  # e.g. ZeRO-3's fixed buckets outweigh what it partitions for a small model
            out.append(Suggestion(setting, round(total / GiB, 2), total <= usable))

    for stage in range(z.stage + 1, 4):
        add(f"deepspeed.zero_stage={stage}", rank_memory(t.trace, dataclasses.replace(z, stage=stage)).total)
    if z.stage >= 1:  # partitioned states shrink with more ranks
        world = z.world_size
        for _ in range(6):
            world *= 2
            total = rank_memory(t.trace, dataclasses.replace(z, world_size=world)).total
            if total <= usable or world >= 8 * z.world_size:
                add(f"cluster.num_workers={world}", total)
                break
    key = checkpointing_key(exp)
    on = key is not None and _get(exp, key)
    if key is not None and not on:
        ck = with_setting(exp, key, True)
        add(f"{key}=true", rank_memory(_trace(ck, data, t.entry).trace, z).total)
    if not isinstance(t.entry.source, ActorFedSource):
        b, accum = int(exp.data.batch_size), z.grad_accum
        while b > 1:
            b, accum = b // 2, accum * 2
            smaller = with_setting(with_setting(exp, "data.batch_size", b), "optim.grad_accum", accum)
            total = rank_memory(_trace(smaller, data, t.entry).trace, dataclasses.replace(z, grad_accum=accum)).total
            if total <= usable or b == 1:
                add(f"data.batch_size={b} optim.grad_accum={accum}", total)
                break
    return out


def _get(exp: Any, key: str) -> Any:
    node = exp
    for p in key.split("."):
        node = getattr(node, p)
    return node
