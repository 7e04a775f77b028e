"""The ONE rank loop: any registered `Method` (system/methods/base.py) under DeepSpeed, fed by any
`BatchSource`, with LR schedule, EMA, metrics, checkpoints, fault injection, export and sample
grids. Runs inside a Ray Train worker (train_pool.py) or in any process with torch.distributed
initialised (tests, world size 1). Nothing here knows a method or a data kind by name.

Preemption: SIGTERM on any rank (a spot node's notice reaching the process; the handler is
installed where Python allows it, i.e. when the loop runs on the main thread) or the pool's
preemption notice (`WorkerContext.preempted`, e.g. Ray Train's `get_preemption_info`) is agreed
on by all ranks at every step boundary (one all-reduce of two flags over a CPU group). After
SIGTERM the ranks commit a checkpoint at that step and raise `Preempted`, so the restarted job
resumes from it; after a notice they commit once and keep training until the node is taken."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from cluster.checkpoint import CheckpointRef, CheckpointStore, TrainState, commit_checkpoint
from cluster.integrity import DamagedCheckpoint
from cluster.restore import restore_checkpoint
from cluster.engine import DeepSpeedStrategy
from cluster.job import TrainJob, WorkerContext
from cluster.paths import run_url
from cluster.reporting import RunLogger
from system.config import Experiment, FaultConfig, to_yaml
from cluster.validation import validate_on_ranks
from system.data.sources import SourceContext
from system.methods.base import Collective, Method, frozen
from system.models.artifacts import write_export, write_model_json
from system.train_utils import EMA, capture_rng_state, lr_factor, restore_rng_state, save_image_grid, seed_everything, set_deterministic

SESSIONS_FILE = "sessions.jsonl"  # one line per (re)start of the pool: submission id, start step, world size


class DistCollective(Collective):
    """`Collective` over the default torch.distributed group (identity when it is not initialised)."""

    _OPS = {"sum": "SUM", "max": "MAX"}

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        out = t.detach().clone()
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(out, op=getattr(dist.ReduceOp, self._OPS.get(op, "SUM")))
        return out / self.world_size if op == "mean" and dist.is_initialized() else out

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        if not (dist.is_initialized() and self.world_size > 1):
            return t.detach().clone()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.detach().contiguous())
        return torch.cat(parts)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    return batch.to(device) if callable(getattr(batch, "to", None)) else batch  # e.g. Rollouts


def agreed_resume_point(store: CheckpointStore, rank: int) -> Optional[CheckpointRef]:
    """Collective: rank 0 picks the newest complete checkpoint not marked bad (and deletes unfinished
    ones after it); every rank gets the same ref, or None to start from scratch. An error of rank 0
    (e.g. `NoIntactCheckpoint`: every committed checkpoint is bad) is raised on every rank."""
    choice: Any = None
    if rank == 0:
        try:
            choice = store.latest_complete()
            store.remove_incomplete(after=choice.step if choice else -1)
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            choice = e
    if dist.is_initialized():
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
    if isinstance(choice, Exception):
        raise choice
    return choice


class Preempted(RuntimeError):
    """The rank loop stopped after committing checkpoint `step` because a rank got SIGTERM: run the
    job again (Ray Train: a restart) to continue from it."""

    def __init__(self, step: int, url: str):
        super().__init__(f"stopped on SIGTERM after committing step {step} ({url}); run again to continue from it")
        self.step, self.url = step, url


def control_group() -> Any:
    """Collective: a process group for small CPU flags (the default group when it runs gloo, else a
    new gloo group, so a per-step flag costs no GPU synchronisation); None without torch.distributed."""
    if not dist.is_initialized():
        return None
    return None if "gloo" in str(dist.get_backend()) else dist.new_group(backend="gloo")


class StopWatch:
    """Whether any rank must stop (SIGTERM) or the pool announced a preemption. Use as a context
    (installs the SIGTERM handler on the main thread, restores the previous one on exit; a second
    SIGTERM gets the previous handler, so an impatient sender still terminates the process).
    `poll()` is collective: every rank calls it once per step."""

    def __init__(self, world_size: int, preempted: Callable[[], bool] = lambda: False, group: Any = None):
        self.world_size, self.preempted, self.group = world_size, preempted, group
        self.signalled = False
        self._previous: Any = None
        self._installed = False

    def _on_sigterm(self, signum, frame) -> None:
        self.signalled = True
        signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)

    def __enter__(self) -> "StopWatch":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
        self._installed = False

    def poll(self) -> tuple[bool, bool]:
        """Collective: (some rank got SIGTERM, some rank sees a preemption notice)."""
        flags = torch.tensor([float(self.signalled), float(bool(self.preempted()))])
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flags[0] > 0), bool(flags[1] > 0)


def maybe_crash(fault: FaultConfig, store: CheckpointStore, rank: int, step: int) -> None:
    """Fault injection: kill this worker process once per run at `fault.crash_at_step` (marker in the run dir)."""
    if fault.crash_at_step is None or step != fault.crash_at_step or rank != fault.crash_rank:
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
        """Mean over steps and ranks (collective; the one host sync of the metrics)."""
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


def phase_metrics(index: int, phase: str, loss: torch.Tensor, metrics: dict) -> dict:
    """The first phase logs `loss` and its metrics as named; later ones `<phase>_loss`, `<phase>/<k>`."""
    if index == 0:
        return {"loss": loss.detach(), **metrics}
    return {f"{phase}_loss": loss.detach(), **{f"{phase}/{k}": v for k, v in metrics.items()}}


class RankLoop:
    """One rank's training session: engines per module, resume, the step loop, commit, export."""

    def __init__(self, exp: Experiment, ctx: WorkerContext, job: TrainJob):
        self.exp, self.ctx, self.job = exp, ctx, job
        self.rank0 = ctx.rank == 0
        set_deterministic(ctx.device.type == "cuda")
        seed_everything(exp.seed)  # identical model init on every rank
        self.method = job.method(exp.method, job.data)
        self.method.collective = DistCollective(ctx.rank, ctx.world_size)
        self.method = self.method.to(ctx.device) or self.method
        specs = self.method.modules()
        self.phases = list(self.method.phases())
        unknown = [p for p in self.phases if p not in specs]
        if unknown or not self.phases:
            raise ValueError(f"{type(self.method).__name__}.phases() = {self.phases} must name modules of modules() = {sorted(specs)}")
        o = exp.optim
        self.strategy = DeepSpeedStrategy(exp.deepspeed, o, ctx.device, micro_batch_size=job.micro_batch_size,
                                          world_size=ctx.world_size)
        self.base_lr = {n: (s.lr if s.lr is not None else o.lr) for n, s in specs.items()}
        self.engines = {
            n: self.strategy.prepare(s.module, lr=self.base_lr[n], betas=tuple(s.betas or o.betas), weight_decay=s.weight_decay,
                                     external=self.method.external_parameters(n, s.module), no_decay=s.no_decay)
            for n, s in specs.items()
        }
        self.mods = {n: e.module for n, e in self.engines.items()}
        if exp.train.compile:
            for e in self.engines.values():
                e.module.compile()
        self.emas = {n: EMA(self.strategy.local_params(self.engines[n]), s.ema_decay) for n, s in specs.items() if s.ema_decay > 0}
        self.store = CheckpointStore(run_url(exp), exp.data.storage)
        seed_everything(exp.seed + 7919 * (ctx.rank + 1))  # per-rank stream for dropout, noise, sampling
        self.state = TrainState(step=0, emas=self.emas, ema_partitioned=self.strategy.zero_stage == 3, method=self.method,
                                modules=self.mods)
        self.sctx = SourceContext(
            rank=ctx.rank, world_size=ctx.world_size, device=ctx.device, seed=exp.seed, max_steps=exp.train.max_steps,
            collective=self.method.collective, module_state=lambda n: self.strategy.gathered_state_dict(self.engines[n]),
            step=lambda: self.state.step)
        self.source = job.source(exp, self.sctx)
        self.state.reader = self.source
        self.watch = StopWatch(ctx.world_size, getattr(ctx, "preempted", lambda: False), control_group())
        self.notice_before = False  # a preemption notice is answered by one checkpoint when it appears

    # ------------------------------------------------------------------ session
    def run(self) -> dict:
        with self.watch:
            try:
                return self._run()
            except Preempted as e:
                if self.rank0:
                    print(f"[{self.exp.run_name}] {e}", flush=True)
                self.logger.close()
                self.source.close()
                raise

    def _run(self) -> dict:
        exp, ctx, state = self.exp, self.ctx, self.state
        ref = agreed_resume_point(self.store, ctx.rank)
        while ref is not None:
            try:
                restore_checkpoint(self.store, ref, self.strategy, self.engines, state, rank=ctx.rank,
                                   world_size=ctx.world_size, run_name=exp.run_name)
                break
            except DamagedCheckpoint:  # raised on every rank, nothing loaded, `ref` marked bad: the previous one
                ref = agreed_resume_point(self.store, ctx.rank)
        self.verified = ref.step if ref is not None else None  # retention keeps it (the last checkpoint checked)
        if ref is not None and self.rank0:
            print(f"[{exp.run_name}] resumed from {ref.url} (step {ref.step})", flush=True)
        start = state.step
        if self.rank0:
            ctx.progress({"kind": "start", "step": start, "resumed_from": ref.url if ref is not None else None})
        if self.rank0:
            rows = self.store.read_jsonl(SESSIONS_FILE)
            rows.append({"submission": self.job.submission, "start_step": start, "world_size": ctx.world_size, "time": time.time()})
            self.store.write_bytes(SESSIONS_FILE, "".join(json.dumps(r) + "\n" for r in rows).encode())
        self.logger = RunLogger(exp, self.store, start_step=start, enabled=self.rank0)
        self.committed = ref.step if ref is not None else None
        self.last: dict[str, float] = {}
        if ref is None:
            self.validate("val_start")  # the untrained baseline
        t_start = time.perf_counter()
        it = iter(self.source)
        batch = self.train(it)
        if self.committed != state.step:
            self.commit()  # e.g. max_steps reached before a first checkpoint on a resubmitted finished run
        if exp.checkpoint.export:
            self.export()
        if batch is None:
            batch = to_device(next(it), ctx.device)
        self.write_samples(batch)
        wall = time.perf_counter() - t_start
        per_step = self.job.micro_batch_size * exp.optim.grad_accum * ctx.world_size
        self.logger.summary({
            "step": state.step, "start_step": start, "wall_s": wall, "world_size": ctx.world_size,
            "images_per_s_session": per_step * (state.step - start) / max(wall, 1e-9), **self.source.summary(),
        })
        self.logger.close()
        self.source.close()
        barrier()
        return {"step": state.step, **self.last}

    def train(self, it) -> Any:
        """Steps to `train.max_steps`; returns the last batch (None when no step ran)."""
        exp, ctx, state, o = self.exp, self.ctx, self.state, self.exp.optim
        meter, batch = Meter(), None
        per_step = self.job.micro_batch_size * o.grad_accum * ctx.world_size
        t_log, since_log = time.perf_counter(), 0
        while state.step < exp.train.max_steps:
            s = state.step
            f = lr_factor(s, warmup_steps=o.warmup_steps, max_steps=exp.train.max_steps, min_ratio=o.min_lr / o.lr,
                          schedule=o.schedule)
            for n, e in self.engines.items():
                self.strategy.set_lr(e, self.base_lr[n] * f)
            for _ in range(o.grad_accum):
                batch = to_device(next(it), ctx.device)
                carry: dict = {}
                for i, phase in enumerate(self.phases):
                    e = self.engines[phase]
                    with frozen(*(m for n, m in self.mods.items() if n != phase)), self.strategy.autocast(e):
                        out = self.method.step(phase, self.mods, batch, s, carry)
                    self.strategy.backward(e, out.loss)
                    self.strategy.step(e)
                    meter.add(phase_metrics(i, phase, out.loss, out.metrics))
                    carry.update(out.aux)
            meter.count += o.grad_accum
            state.step += 1
            since_log += 1
            for n, ema in self.emas.items():
                if state.step % exp.train.ema_every == 0:
                    ema.update(self.strategy.local_params(self.engines[n]), ema.warmup_decay(state.step))
            self.logger.step()
            maybe_crash(exp.fault, self.store, ctx.rank, state.step)
            if state.step % exp.logging.log_every == 0 or state.step == exp.train.max_steps:
                self.last = meter.reduce(ctx.device, ctx.world_size)
                dt = time.perf_counter() - t_log
                self.last.update(lr=o.lr * f, images_per_s=per_step * since_log / max(dt, 1e-9))
                self.last.update(self.method.rate_metrics(self.last["images_per_s"]))
                self.logger.log(state.step, self.last)
                if self.rank0:
                    ctx.progress({"kind": "step", "step": state.step, "loss": self.last.get("loss"),
                                  "images_per_s": self.last["images_per_s"]})
                t_log, since_log = time.perf_counter(), 0
            if exp.train.sample_every and state.step % exp.train.sample_every == 0:
                self.write_samples(batch)
            if state.step == exp.train.max_steps or (exp.train.val_every and state.step % exp.train.val_every == 0):
                self.validate()
                if state.step == exp.train.max_steps and self.emas:
                    self.validate("val_ema", ema=True)
            stop, notice = self.watch.poll()
            fresh, self.notice_before = notice and not self.notice_before, notice
            if stop or fresh or state.step % exp.checkpoint.every_steps == 0 or state.step == exp.train.max_steps:
                self.commit()
            if stop:
                raise Preempted(state.step, self.store.ckpt_url(state.step))
        return batch

    # ------------------------------------------------------------------ outputs
    def validate(self, prefix: str = "val", ema: bool = False) -> dict[str, float]:
        """Collective: the method's validation on this rank's share of the validation split
        (cluster/validation.py), logged as `<prefix>/<metric>` at the current step and reported with
        the next commit; with `ema` on the EMA weights. {} when the method or the data has none."""
        if type(self.method).validate is Method.validate:
            return {}
        source = self.job.source.validation(self.exp, self.sctx)
        if source is None:
            return {}
        try:
            # ZeRO-3 partitions parameters outside each module's own forward (e.g. a codebook a
            # tokenizer's encode reads): the ranks hold the full weights while they validate
            with self._weights(ema), self._gathered_if_partitioned(), self.strategy.autocast(self.engines[self.phases[0]]):
                metrics = validate_on_ranks(
                    self.method, self.mods, source.one_epoch(), world_size=self.ctx.world_size,
                    batch_size=self.job.micro_batch_size, max_images=self.exp.train.val_max_images,
                    device=self.ctx.device, to_device=to_device)
        finally:
            source.close()
        if not metrics:
            return {}
        out = {f"{prefix}/{k}": v for k, v in metrics.items()}
        self.logger.log(self.state.step, out)
        self.last.update(out)
        return out

    def commit(self) -> None:
        # metrics.jsonl (and the logs) first: a kill between them and the commit marker then loses no
        # row (a resume keeps the rows up to its step); the other way round it lost the rows since the
        # last commit (the fault soak: driver killed at step 3, metrics held steps 1, 2, 5, 6)
        self.logger.flush()
        commit_checkpoint(self.store, self.strategy, self.engines, self.state, rank=self.ctx.rank,
                          world_size=self.ctx.world_size, run_name=self.exp.run_name, keep_last=self.exp.checkpoint.keep_last,
                          verified=self.verified, info={"zero_stage": self.strategy.zero_stage})
        self.committed = self.state.step
        self.logger.curves(self.method.curve_keys())
        self.ctx.report({"step": self.state.step, **self.last}, self.store.ckpt_url(self.state.step))
        if self.rank0:
            self.ctx.progress({"kind": "checkpoint", "step": self.state.step, "url": self.store.ckpt_url(self.state.step),
                               "loss": self.last.get("loss")})

    @contextlib.contextmanager
    def _weights(self, ema: bool):
        """Inside: the modules hold their EMA weights when `ema` (swapped back on exit), else as they are."""
        swapped = [(self.emas[n], self.engines[n]) for n in self.emas] if ema else []
        for e_ma, e in swapped:
            e_ma.swap(self.strategy.local_params(e))
        try:
            yield
        finally:
            for e_ma, e in swapped:
                e_ma.swap(self.strategy.local_params(e))

    def _gathered_if_partitioned(self):
        """`_gathered()` under ZeRO-3 (collective), else nothing to do."""
        return self._gathered() if self.strategy.zero_stage == 3 else contextlib.nullcontext()

    @contextlib.contextmanager
    def _gathered(self):
        """Collective: every rank sees the full parameters of every module inside."""
        with contextlib.ExitStack() as stack:
            yield {n: stack.enter_context(self.strategy.gathered(e)) for n, e in self.engines.items()}

    def export(self) -> None:
        """Collective: `method.artifacts` as `<run>/export/<part>.safetensors` (and `<part>_ema` from
        the EMA weights), full weights for any ZeRO stage, with model.json and the resolved config."""
        variants = [("", False)] + ([("_ema", True)] if self.emas else [])
        arts: dict = {}
        for suffix, use_ema in variants:
            with self._weights(use_ema), self._gathered() as mods:
                arts = self.method.artifacts(mods) if self.rank0 else {}
                for a in arts.values():
                    a.state_dict = {k: v.detach().cpu().clone().contiguous() for k, v in a.state_dict.items()}
            if self.rank0:
                write_export(lambda rel, data: self.store.write_bytes(f"export/{rel}", data), arts, suffix,
                             metadata={"run_name": self.exp.run_name})
        if self.rank0:
            self.store.write_bytes("export/config.yaml", to_yaml(self.exp).encode())
            write_model_json(lambda rel, data: self.store.write_bytes(f"export/{rel}", data), arts)
        barrier()

    @torch.no_grad()
    def write_samples(self, batch: Any) -> None:
        """Collective: rank 0 writes `<run>/samples/step_%08d.png` from `method.sample_images`. Under
        ZeRO-3 the ranks first consolidate the weights and rank 0 samples with plain copies of the
        modules (sampling reads weights outside module forwards, which ZeRO-3 keeps partitioned).
        The global RNG streams are left as they were, so sampling does not change training."""
        small = self.method.sample_batch(batch, self.exp.train.sample_grid)
        if small is None:
            return
        rng = capture_rng_state()
        rows: dict = {}
        try:
            mods: Optional[dict] = self.mods if self.rank0 else None
            if self.strategy.zero_stage == 3:
                full = {n: self.strategy.gathered_state_dict(e) for n, e in self.engines.items()}  # collective
                mods = None
                if self.rank0:
                    mods = {n: s.module for n, s in self.method.modules().items()}
                    for n, m in mods.items():
                        m.load_state_dict(full[n])
                        m.to(self.ctx.device)
            if mods is not None:
                flags = {n: m.training for n, m in mods.items()}
                for m in mods.values():
                    m.eval()
                try:
                    with self.strategy.autocast(self.engines[self.phases[0]]):
                        rows = self.method.sample_images(mods, small, seed=self.exp.seed + self.state.step)
                finally:
                    for n, m in mods.items():
                        m.train(flags[n])
        finally:
            restore_rng_state(rng)
        if self.rank0 and rows:
            buf = io.BytesIO()
            save_image_grid(rows, buf, title=f"{self.exp.run_name}, step {self.state.step}")
            self.store.write_bytes(f"samples/step_{self.state.step:08d}.png", buf.getvalue())
        barrier()


def train_loop(exp: Experiment, ctx: WorkerContext, job: TrainJob) -> dict:
    """Train `job.method` from the newest complete checkpoint (or from scratch) to
    `exp.train.max_steps`; returns the last logged metrics and the final step."""
    return RankLoop(exp, ctx, job).run()
