"""The plan's memory model (system/plan/memory.py) against DeepSpeed's own estimators and against a
measured run.

Estimators: DeepSpeed's `estimate_zero2_model_states_mem_needs_all_cold` / ZeRO-3 cold estimator
assume 16-bit weights (fp16/bf16 mode): per GPU 2P + 18P/N (ZeRO-2: 16-bit weights; 16-bit and
fp32 gradient partitions, fp32 master, Adam) and 4L + 18P/N (ZeRO-3, L the largest layer). Our
engines keep fp32 weights under torch autocast (cluster/engine.py) and one fp32 gradient partition:
4P + 16P/N and 20P/N + (gathered layer: our working set, counted apart). So ours - theirs is exactly
2P - 2P/N for ZeRO-2 and 2P/N - 4L for ZeRO-3: the fp32 weights (replicated / partitioned) less the
16-bit gradient partition DeepSpeed counts and we do not have.

Measurement: LlamaGen-B (111M parameters: model states with its EMA 16 P = 1.8 GB per rank under
ZeRO-2 on 2 ranks) trained for 4 steps on CPU through the real rank loop (cluster/loop.py,
DeepSpeed, gloo; no Ray) on 2 spawned ranks. tracemalloc does not see torch's allocations, so each
rank samples its own resident set (psutil RSS, every millisecond, on a thread) with glibc's mmap
threshold pinned at 64 KiB (mallopt) so freed tensors go back to the OS and RSS follows the live
bytes; growth = the largest RSS during steps 1-2 (after step 0 allocated the Adam moments, before the
final checkpoint) minus the RSS before the method was built. It must be within 15% of the plan's
bytes per rank for the same config (fp32 on CPU, ZeRO-2, world 2).
"""
from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch

from multirank import run_ranks
from toy_method import MemoryReaderFactory

from system.data.source import BatchSource
from system.data.sources import DataSpec, SourceContext, TokenSpec

SEQ, VOCAB, BATCH, STEPS = 16, 16384, 2, 4
DATA = DataSpec(num_classes=10, tokens=TokenSpec(seq_len=SEQ, vocab_size=VOCAB))


def _exp(storage: str = "unused", world: int = 2):
    from system.config import ARExperiment, load_config

    return load_config(ARExperiment, [
        "run_name=plan-measure", f"checkpoint.storage_path={storage}", "data.url=unused", f"data.batch_size={BATCH}",
        "data.num_workers=0", "method.model=llamagen-b", "method.ema_decay=0.999", "method.class_dropout=0.0",
        "deepspeed.zero_stage=2", "cluster.device=cpu", f"cluster.num_workers={world}", f"train.max_steps={STEPS}",
        "train.sample_grid=0", "checkpoint.every_steps=1000", "checkpoint.export=false", "optim.warmup_steps=0",
        "logging.wandb_mode=disabled", "logging.progress=false", "logging.log_every=1000"],
        ["base.yaml", "experiments/ar_llamagen.yaml"])


# ------------------------------------------------------------------------------- DeepSpeed's estimators
def _printed_gpu_gb(fn, *args, **kwargs) -> float:
    """The per-GPU GB of the row without offload of an `*_all_cold` estimator's printed table."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args, **kwargs)
    rows = [ln for ln in out.getvalue().splitlines()
            if "offload_optimizer=none" in ln and ("offload_param" not in ln or "offload_param=none" in ln)]
    return float(re.findall(r"([\d.]+)GB", rows[0])[1])


@pytest.mark.parametrize("world", [8, 32])
def test_model_states_against_deepspeed_estimators(world):
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs, estimate_zero3_model_states_mem_needs_all_cold)
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs, estimate_zero2_model_states_mem_needs_all_cold)

    from system.methods import registry
    from system.plan import ZeroSetting, model_state_bytes
    from system.plan.train import _trace

    exp = _exp(world=world)
    gen = _trace(exp, DATA, registry.for_config(exp.method)).trace.modules["ar"]  # the planned model
    p, largest, n = gen.trainable, gen.largest_layer, world
    assert p == pytest.approx(111e6, rel=0.01)
    z2, z3 = (ZeroSetting(stage=s, world_size=n, precision="bf16", on_gpu=True) for s in (2, 3))

    _, ds2 = estimate_zero2_model_states_mem_needs(p, num_gpus_per_node=8, num_nodes=n // 8, cpu_offload=False)
    assert model_state_bytes(p, 0, z2) - ds2 == pytest.approx(2 * p - 2 * p / n, abs=2)
    assert _printed_gpu_gb(estimate_zero2_model_states_mem_needs_all_cold, p, 8, n // 8) == pytest.approx(ds2 / 2**30, abs=0.01)

    _, ds3, _ = estimate_zero3_model_states_mem_needs(p, largest, num_gpus_per_node=8, num_nodes=n // 8, cpu_offload=False,
                                                   cpu_offload_params=False)
    assert model_state_bytes(p, 0, z3) - ds3 == pytest.approx(2 * p / n - 4 * largest, abs=8)
    assert _printed_gpu_gb(estimate_zero3_model_states_mem_needs_all_cold, p, largest, 8, n // 8) == pytest.approx(
        ds3 / 2**30, abs=0.01)


# ------------------------------------------------------------------------------- measured on 2 ranks
class TokenMemory(BatchSource):
    """Random token sequences (B, SEQ), endless; position = number of batches served."""

    def __init__(self, rank: int):
        self.g, self.pos = torch.Generator().manual_seed(rank), 0

    def __iter__(self):
        while True:
            self.pos += 1
            yield {"codes": torch.randint(0, VOCAB, (BATCH, SEQ), generator=self.g),
                   "label": torch.randint(0, 10, (BATCH,), generator=self.g), "key": [f"t{self.pos}-{i}" for i in range(BATCH)]}

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])


class TokenMemoryFactory(MemoryReaderFactory):
    """Picklable factory of `TokenMemory` sources (nothing to check, no validation split)."""

    def __call__(self, exp, ctx: SourceContext) -> TokenMemory:
        return TokenMemory(ctx.rank)


def _measure_rank(rank: int, world: int, storage: str) -> dict:
    import ctypes
    import threading
    import time

    import psutil

    from cluster.job import TrainJob, WorkerContext
    from cluster.loop import train_loop
    from system.methods.ar import ARMethod

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD: fixed, so large frees return to the OS
    libc.mallopt(-1, 65536)  # M_TRIM_THRESHOLD
    marks: dict[int, float] = {}

    class Marked(ARMethod):  # the loop calls step once per micro-batch: the time each step starts
        def step(self, phase, mods, batch, step, carry):
            marks.setdefault(step, time.monotonic())
            return super().step(phase, mods, batch, step, carry)

    proc, samples, stop = psutil.Process(), [], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), proc.memory_info().rss))
            time.sleep(0.001)

    exp = _exp(storage, world)
    job = TrainJob(method=Marked, data=DATA, source=TokenMemoryFactory(), micro_batch_size=BATCH)
    base = proc.memory_info().rss
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    train_loop(exp, WorkerContext(rank, world, torch.device("cpu")), job)
    stop.set()
    thread.join()
    window = [rss for t, rss in samples if marks[1] <= t < marks[STEPS - 1]]
    steady = min(rss for t, rss in samples if t >= marks[1]) - base
    return {"base": base, "peak": max(window), "samples": len(window), "steady": steady}


@pytest.mark.slow
def test_measured_memory_within_15_percent_of_the_plan(tmp_path):
    from system.plan import plan_training

    plan = plan_training(_exp(str(tmp_path)), DATA, suggest=False)
    m = plan.memory
    assert m.weights + m.master + m.optimizer + m.ema > 2**30  # model states above 1 GB per rank
    results = run_ranks(_measure_rank, 2, str(tmp_path), timeout=900)
    for rank, r in enumerate(results):
        growth = r["peak"] - r["base"]
        print(f"rank {rank}: measured growth {growth / 2**30:.3f} GiB, planned {m.total / 2**30:.3f} GiB "
              f"(ratio {growth / m.total:.3f}; steady state at a step start {r['steady'] / 2**30:.3f} GiB)")
        assert r["samples"] > 100
        assert growth == pytest.approx(m.total, rel=0.15), (
            f"measured {growth / 2**30:.3f} GiB vs planned {m.total / 2**30:.3f} GiB ({m.as_gb()})")
