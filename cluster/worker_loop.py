"""The per-worker training loop: any `Method` under DeepSpeed, with EMA, LR schedule, checkpoints,
fault injection, logging, export and sample grids. Runs inside a Ray Train worker (see
train_pool.py) or in any process with torch.distributed initialised (tests, world size 1)."""
from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from safetensors.torch import save as safetensors_bytes

from cluster.checkpoint import CheckpointRef, CheckpointStore, TrainState, commit_checkpoint, restore_checkpoint
from cluster.engine import DeepSpeedStrategy, frozen
from cluster.reporting import RunLogger
from system.config.load import to_yaml
from system.data.storage import join
from system.models.export_io import MODEL_JSON, write_model_json
from system.train_utils import EMA, capture_rng_state, lr_factor, restore_rng_state, save_image_grid, seed_everything, set_deterministic

ReaderFactory = Callable[[Any, int, int], Any]  # (cfg, rank, world_size) -> reader


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device
    # report(metrics, checkpoint_url or None): all ranks call it at each commit (Ray: ray.train.report)
    report: Callable[[dict, Optional[str]], None] = field(default=lambda metrics, url: None)


def run_url(cfg) -> str:
    return join(cfg.checkpoint.storage_path, cfg.run_name)


def checkpoint_storage(cfg):
    """Storage options for checkpoints: `checkpoint.storage` if the schema has it, else `data.storage`."""
    return getattr(cfg.checkpoint, "storage", None) or cfg.data.storage


def default_reader(cfg, rank: int, world_size: int):
    from system.data.reader import ShardReader

    d = cfg.data
    return ShardReader(
        d.url, rank=rank, world_size=world_size, batch_size=d.batch_size, resolution=d.resolution,
        num_workers=d.num_workers, seed=cfg.seed, random_flip=d.random_flip, fraction=d.fraction, storage=d.storage,
    )


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def agreed_resume_point(store: CheckpointStore, rank: int) -> Optional[CheckpointRef]:
    """Collective: rank 0 picks the newest complete checkpoint (and deletes unfinished ones after
    it); every rank gets the same ref, or None to start from scratch."""
    ref = store.latest_complete() if rank == 0 else None
    if rank == 0:
        store.remove_incomplete(after=ref.step if ref else -1)
    if dist.is_initialized():
        box = [ref]
        dist.broadcast_object_list(box, src=0)
        ref = box[0]
    return ref


def maybe_crash(cfg, store: CheckpointStore, rank: int, step: int) -> None:
    """Fault injection: kill this worker process once per run at `fault.crash_at_step` (marker in the run dir)."""
    f = cfg.fault
    if f.crash_at_step is None or step != f.crash_at_step or rank != f.crash_rank:
        return
    rel = f"fault/crash_at_step_{step:08d}.json"
    if store.exists(rel):
        return
    store.write_bytes(rel, json.dumps({"step": step, "rank": rank, "time": time.time()}).encode())
    print(f"[fault] injected crash of rank {rank} at step {step}", flush=True)
    os._exit(1)


class Meter:
    """Sums of step metrics since the last log (tensors stay on device until logged)."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.count = 0
        self.keys_checked = False

    def add(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            v = v.detach().float() if torch.is_tensor(v) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def reduce(self, device: torch.device, world_size: int) -> dict[str, float]:
        """Mean over steps and ranks (collective)."""
        keys = sorted(self.sums)
        if dist.is_initialized() and not self.keys_checked:
            all_keys: list = [None] * world_size
            dist.all_gather_object(all_keys, keys)
            if any(k != keys for k in all_keys):
                raise RuntimeError(f"ranks report different metric names: {all_keys}; a method must log the same keys on every rank")
            self.keys_checked = True
        vec = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32, device=device) for k in keys]) if keys else None
        if vec is not None and dist.is_initialized():
            dist.all_reduce(vec)
        n = max(self.count, 1) * (world_size if dist.is_initialized() else 1)
        out = {k: float(v) / n for k, v in zip(keys, vec.tolist())} if vec is not None else {}
        self.sums, self.count = {}, 0
        return out


def train_worker(cfg, ctx: WorkerContext, method_factory: Callable, reader_factory: Optional[ReaderFactory] = None) -> dict:
    """Train `method_factory(cfg)` from the newest complete checkpoint (or from scratch) to
    `cfg.train.max_steps`; returns the last logged metrics (rank 0) and the final step."""
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    rank0 = rank == 0
    set_deterministic(device.type == "cuda")
    seed_everything(cfg.seed)  # identical model init on every rank
    method = method_factory(cfg)
    method = method.to(device) or method
    gen, disc = method.build_generator(), method.build_discriminator()
    o = cfg.optim
    strategy = DeepSpeedStrategy(cfg.deepspeed, o, device, micro_batch_size=cfg.data.batch_size, world_size=world)
    engines = {"gen": strategy.prepare(gen, lr=o.lr, betas=tuple(o.betas))}
    if disc is not None:
        engines["disc"] = strategy.prepare(disc, lr=o.disc_lr, betas=tuple(o.disc_betas))
    gen_e, disc_e = engines["gen"], engines.get("disc")
    gen_m, disc_m = gen_e.module, (disc_e.module if disc_e is not None else None)
    if cfg.model.compile:
        for e in engines.values():
            e.module.compile()
    ema = EMA(strategy.local_params(gen_e), cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    reader = (reader_factory or default_reader)(cfg, rank, world)
    store = CheckpointStore(run_url(cfg), checkpoint_storage(cfg))
    seed_everything(cfg.seed + 7919 * (rank + 1))  # per-rank stream for dropout, noise, sampling
    state = TrainState(step=0, ema=ema, ema_partitioned=strategy.is_partitioned(gen_e), reader=reader, method=method)

    ref = agreed_resume_point(store, rank)
    if ref is not None:
        restore_checkpoint(store, ref, strategy, engines, state, rank=rank, world_size=world, run_name=cfg.run_name)
        if rank0:
            print(f"[{cfg.run_name}] resumed from {ref.url} (step {ref.step})", flush=True)
    start_step = state.step
    logger = RunLogger(cfg, store, start_step=start_step, enabled=rank0)
    meter = Meter()
    images_per_step = cfg.data.batch_size * o.grad_accum * world
    t_log, steps_since_log, t_start = time.perf_counter(), 0, time.perf_counter()
    last: dict[str, float] = {}
    committed = ref.step if ref is not None else None

    def commit() -> None:
        nonlocal committed
        commit_checkpoint(store, strategy, engines, state, rank=rank, world_size=world, barrier=barrier,
                          run_name=cfg.run_name, keep_last=cfg.checkpoint.keep_last, info={"zero_stage": strategy.zero_stage})
        committed = state.step
        logger.flush()
        ctx.report({"step": state.step, **last}, store.ckpt_url(state.step))

    it = iter(reader)
    batch: dict = {}
    while state.step < cfg.train.max_steps:
        s = state.step
        f = lr_factor(s, warmup_steps=o.warmup_steps, max_steps=cfg.train.max_steps, min_ratio=o.min_lr / o.lr, schedule=o.schedule)
        strategy.set_lr(gen_e, o.lr * f)
        if disc_e is not None:
            strategy.set_lr(disc_e, o.disc_lr * f)
        for _ in range(o.grad_accum):
            batch = _to_device(next(it), device)
            with frozen(disc_m), strategy.autocast(gen_e):
                out = method.generator_step(gen_m, disc_m, batch, s)
            strategy.backward(gen_e, out.loss)
            strategy.step(gen_e)
            meter.add({"loss": out.loss, **out.metrics})
            if disc_e is not None:
                with strategy.autocast(disc_e):
                    d = method.discriminator_step(disc_m, batch, out.aux, s)
                strategy.backward(disc_e, d.loss)
                strategy.step(disc_e)
                meter.add({"disc_loss": d.loss, **{f"disc/{k}": v for k, v in d.metrics.items()}})
        meter.count += o.grad_accum
        state.step += 1
        steps_since_log += 1
        if ema is not None and state.step % cfg.train.ema_every == 0:
            # warm-up of the decay so short runs get a useful EMA: min(decay, (1 + n) / (10 + n))
            ema.update(strategy.local_params(gen_e), min(cfg.train.ema_decay, (1 + state.step) / (10 + state.step)))
        logger.step()
        maybe_crash(cfg, store, rank, state.step)
        if state.step % cfg.logging.log_every == 0 or state.step == cfg.train.max_steps:
            last = meter.reduce(device, world)
            dt = time.perf_counter() - t_log
            last.update(lr=o.lr * f, images_per_s=images_per_step * steps_since_log / max(dt, 1e-9))
            logger.log(state.step, last)
            t_log, steps_since_log = time.perf_counter(), 0
        if cfg.train.sample_every and state.step % cfg.train.sample_every == 0:
            write_samples(cfg, method, strategy, gen_e, batch, store, state.step, rank0)
        if state.step % cfg.checkpoint.every_steps == 0 or state.step == cfg.train.max_steps:
            commit()

    if committed != state.step:
        commit()  # e.g. max_steps reached before a first checkpoint on a resubmitted finished run
    if cfg.checkpoint.export:
        export_weights(cfg, method, strategy, gen_e, ema, store, rank0)
    sample_batch = _to_device(next(it), device)
    write_samples(cfg, method, strategy, gen_e, sample_batch, store, state.step, rank0)
    wall = time.perf_counter() - t_start
    trained = state.step - start_step
    logger.summary({
        "step": state.step, "start_step": start_step, "wall_s": wall, "world_size": world,
        "images_per_s_session": images_per_step * trained / max(wall, 1e-9),
    })
    logger.close()
    return {"step": state.step, **last}


def export_weights(cfg, method, strategy: DeepSpeedStrategy, gen_e, ema: Optional[EMA], store: CheckpointStore, rank0: bool) -> None:
    """Collective: `method.export(gen)` as `<run>/export/<name>.safetensors` (and `<name>_ema`
    from the EMA weights), full weights for any ZeRO stage, with the resolved config beside them."""
    variants = [("", None)] + ([("_ema", ema)] if ema is not None else [])
    for suffix, swap in variants:
        if swap is not None:
            swap.swap(strategy.local_params(gen_e))
        try:
            with strategy.gathered(gen_e) as module:
                parts = method.export(module) if rank0 else {}
                parts = {n: {k: v.detach().cpu().clone().contiguous() for k, v in sd.items()} for n, sd in parts.items()}
        finally:
            if swap is not None:
                swap.swap(strategy.local_params(gen_e))
        for name, sd in parts.items():
            store.write_bytes(f"export/{name}{suffix}.safetensors", safetensors_bytes(sd, metadata={"run_name": cfg.run_name}))
    if rank0:
        store.write_bytes("export/config.yaml", to_yaml(cfg).encode())
        if hasattr(method, "export_configs"):  # model configs, so loaders need no experiment config
            store.write_bytes(f"export/{MODEL_JSON}", write_model_json(method.export_configs()))
    barrier()


@torch.no_grad()
def write_samples(cfg, method, strategy: DeepSpeedStrategy, gen_e, batch: dict, store: CheckpointStore, step: int, rank0: bool) -> None:
    """Collective: rank 0 writes `<run>/samples/step_%08d.png`. Under ZeRO-3 the ranks first
    consolidate the weights and rank 0 samples with a plain copy of the generator (sampling reads
    weights outside module forwards, e.g. a codebook, which ZeRO-3 keeps partitioned).
    The global RNG streams are left as they were, so sampling does not change training."""
    n = cfg.train.sample_grid
    small = {k: (v[:n] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}
    rng = capture_rng_state()
    rows: dict = {}
    try:
        module = gen_e.module
        if strategy.is_partitioned(gen_e):
            full = strategy.gathered_state_dict(gen_e)  # collective; {} on ranks > 0
            module = None
            if rank0:
                module = method.build_generator()
                module.load_state_dict(full)
                module.to(small["image"].device)
        if module is not None:
            with strategy.autocast(gen_e):
                was_training = module.training
                module.eval()
                rows = method.sample_images(module, small, seed=cfg.seed + step)
                module.train(was_training)
    finally:
        restore_rng_state(rng)
    if rank0 and rows:
        buf = io.BytesIO()
        save_image_grid(rows, buf)
        store.write_bytes(f"samples/step_{step:08d}.png", buf.getvalue())
