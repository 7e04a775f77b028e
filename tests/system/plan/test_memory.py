"""The memory model against hand arithmetic for ZeRO 0/1/2/3 (system/plan/memory.py's table)."""
from __future__ import annotations

import dataclasses

import pytest

from system.plan.memory import ZeroSetting, checkpoint_bytes, model_state_bytes, rank_memory
from system.plan.trace import ModuleParams, StepTrace

P, F, N = 1000, 200, 4  # trainable, frozen parameters; ranks
ACTS, WITH_GRADS = 10_000, 12_000  # traced activation peak without / with the phase's gradients
BUCKET = 50  # reduce_bucket_size (elements)


def _trace(ema: bool = True, frozen_bytes: int = 0) -> StepTrace:
    m = ModuleParams(trainable=P, frozen=F, buffer_bytes=0, used_trainable=P, used_frozen=F, largest_layer=100, small=0,
                     comm_dtypes=1, ema=ema)
    return StepTrace(flops=1.0, flops_by_phase={"gen": 1.0}, activation_peak=ACTS, peak_with_grads=WITH_GRADS,
                     modules={"gen": m}, frozen_params=0, frozen_used=0, frozen_bytes=frozen_bytes)


def _z(stage: int, **kw) -> ZeroSetting:
    return ZeroSetting(stage=stage, world_size=N, precision="fp32", on_gpu=False, reduce_bucket=BUCKET, overlap_comm=False,
                       **kw)


# per stage: (weights, master, Adam, EMA, buckets during backward, gradients at the step, forward/backward peak, step peak)
# on CPU (AdamW's single-tensor loop: two temporaries of its largest tensor)
HAND = {
    # ZeRO-0: 4(P+F) weights, 8P Adam, 4(P+F) EMA; all gradients live in backward (the trace's peak with
    # them); the step holds 4P gradients + AdamW's 2 x 4 x 100 (largest tensor) + a 4P flat all-reduce buffer
    0: (4800, 0, 8000, 4800, 0, 4000, 4800 + 8000 + 4800 + WITH_GRADS, 17600 + 4000 + 800 + 4000),
    # ZeRO-1: master 4P/N and Adam 8P/N; full gradients (+ the flat 4P/N partition at the step); one fp32 bucket
    1: (4800, 1000, 2000, 4800, 200, 5000, 12600 + WITH_GRADS + 200, 12600 + 5000 + 2000),
    # ZeRO-2: the gradient partition 4P/N with the bucket in backward, and its flat copy at the step
    2: (4800, 1000, 2000, 4800, 200, 2000, 12600 + ACTS + 200 + 1000, 12600 + 2000 + 2000),
    # ZeRO-3: weights and EMA 4(P+F)/N; bucket 4x50 + a gathered layer 8x100 + prefetch 4 min(5e7, P+F)
    3: (1200, 1000, 2000, 1200, 200 + 800 + 4800, 1000, 5400 + ACTS + 5800 + 1000, 5400 + 1000 + 2000),
}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_rank_memory_by_hand(stage):
    w, master, adam, ema, comm, grads, fb, step = HAND[stage]
    m = rank_memory(_trace(), _z(stage))
    assert (m.weights, m.master, m.optimizer, m.ema, m.comm, m.gradients) == (w, master, adam, ema, comm, grads)
    assert (m.forward_backward_peak, m.step_peak, m.total) == (fb, step, max(fb, step))
    assert m.activations == (WITH_GRADS if stage <= 1 else ACTS)


def test_frozen_helpers_accumulation_and_offload():
    base = rank_memory(_trace(frozen_bytes=777), _z(2))
    assert base.frozen == 777 and base.total == rank_memory(_trace(), _z(2)).total + 777
    accum = rank_memory(_trace(), _z(2, grad_accum=4))  # the partition stays across micro-batches
    assert accum.gradients == 2000 and accum.forward_backward_peak == 12600 + 1000 + ACTS + 200
    off = rank_memory(_trace(), _z(2, offload_optimizer=True))
    assert off.master == off.optimizer == 0 and off.host_bytes == 16 * P // N
    gpu = rank_memory(_trace(), dataclasses.replace(_z(2), on_gpu=True))  # foreach AdamW: one temporary copy
    assert gpu.step_transient == 4 * P // N and gpu.step_peak == 12600 + 2000 + 1000
    bf16 = rank_memory(dataclasses.replace(_trace(), modules={"gen": dataclasses.replace(_trace().modules["gen"], comm_dtypes=2)}),
                       dataclasses.replace(_z(2), precision="bf16", overlap_comm=True))
    assert bf16.comm == BUCKET * 4 * 2 * 2  # a bucket per communication dtype, doubled with overlap_comm


def test_model_states_and_checkpoint():
    z = _z(2)
    assert model_state_bytes(P, F, z) == 4 * (P + F) + 4 * P // N + 12 * P // N
    assert model_state_bytes(P, F, _z(3), ema=True) == 2 * 4 * (P + F) // N + 4 * P // N + 12 * P // N
    assert model_state_bytes(P, 0, _z(0)) == 16 * P
    assert checkpoint_bytes(_trace(), z) == 4 * (P + F) + 12 * P + 4 * (P + F)
    assert checkpoint_bytes(_trace(ema=False), _z(0)) == 4 * (P + F) + 8 * P
    assert checkpoint_bytes(_trace(ema=False), _z(3)) == 12 * P


def test_setting_from_experiment():
    from system.config import EOSTokExperiment, load_config

    exp = load_config(EOSTokExperiment, ["run_name=r", "data.url=x", "cluster.num_workers=16", "deepspeed.zero_stage=3",
                                         "deepspeed.extra={zero_optimization: {reduce_bucket_size: 1000}}"])
    z = ZeroSetting.of(exp)
    assert (z.stage, z.world_size, z.precision, z.on_gpu, z.reduce_bucket, z.overlap_comm) == (3, 16, "bf16", True, 1000, True)
    cpu = ZeroSetting.of(load_config(EOSTokExperiment, ["run_name=r", "data.url=x", "cluster.device=cpu"]))
    assert (cpu.precision, cpu.reduce_bucket, cpu.overlap_comm) == ("fp32", 50_000_000, False)
