"""VAπ's GRPO learner: one rank of a Ray Train + DeepSpeed pool (`vapi_learner_worker`, run by
`cluster.train_pool.run_pool`), with `GRPOLearner` holding the per-rank logic.

Every iteration, on all ranks (rank 0 alone talks to the rollout pool and reads the data):

    rank 0: gather the rollouts of step k (started at the end of step k-1)
    rank 0: [off-policy] start the rollouts of step k+1 with the weights it already published
    rank 0 -> all: scatter the batch, a whole number of images (groups) per rank
    all:    GRPO update (DeepSpeed averages the gradients over the ranks)
    all:    publish the new weights (gathered first under ZeRO-3); rank 0 puts them in the object store
    rank 0: [on-policy] start the rollouts of step k+1 with the new weights
    all:    checkpoint every `checkpoint.every_steps` (engine + reader position + trained group ids)

A lost learner rank takes the pool down; Ray Train restarts it (`cluster.max_failures`) and every
rank resumes from the newest committed checkpoint (weights, optimizer, reader position, trained
group ids). The rollout actors belong to the driver and survive that; rollouts of the lost session
are not used. On-policy, the resumed run repeats exactly what the lost one did; off-policy, the
first resumed iteration rolls out with the checkpoint's weights where the lost session used the
ones before them (one version fresher), so from there the two runs can differ.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from cluster.checkpoint import CheckpointStore, TrainState, commit_checkpoint, restore_checkpoint
from cluster.engine import DeepSpeedStrategy
from cluster.reporting import RunLogger
from cluster.vapi_pool import PartsFn, RolloutClient, WeightPublisher, vapi_config
from cluster.worker_loop import (Meter, WorkerContext, agreed_resume_point, barrier, checkpoint_storage,
                                 default_reader, maybe_crash, run_url)
from system.methods.grpo import group_advantages
from system.methods.vapi import Rollouts, vapi_loss
from system.train_utils import lr_factor, seed_everything

SESSIONS_FILE = "learner_sessions.jsonl"  # one line per learner (re)start: submission id, start step, time
RESULT_FILE = "vapi_result.json"  # written by rank 0 at the end of a run


class DataState:
    """What rank 0 checkpoints about the data: reader position, trained group ids, and the
    held-out reward before training (so a resumed run still reports the start value)."""

    def __init__(self) -> None:
        self.state: dict = {}

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


class GRPOLearner:
    """One learner rank: the policy as a DeepSpeed engine (`cluster.engine`), an optional frozen
    reference for the KL term, and checkpoints via `cluster.checkpoint` in `<storage_path>/<run_name>`.
    Collective methods (`restore`, `publish`, `update`, `save`) are called on every rank."""

    def __init__(self, cfg, ctx: WorkerContext, parts_fn: PartsFn, publisher: WeightPublisher):
        self.cfg, self.ctx, self.publisher, self.vcfg = cfg, ctx, publisher, vapi_config(cfg)
        seed_everything(cfg.seed)  # identical initial weights on every rank
        # the learner needs the policy only (our AR embeds codes through the tokenizer's codebook, so
        # the tokenizer is still read); w_lpips=0 keeps the VGG16 of the reward off the learner ranks
        policy, _, _ = parts_fn(dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, w_lpips=0.0)))
        policy = policy.to(ctx.device)
        self.reference = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.method.kl > 0 else None
        o = cfg.optim
        per_rank = cfg.data.batch_size // ctx.world_size
        self.strategy = DeepSpeedStrategy(cfg.deepspeed, o, ctx.device, micro_batch_size=per_rank, world_size=ctx.world_size)
        self.engine = self.strategy.prepare(policy, lr=o.lr, betas=tuple(o.betas))
        self.engine.module.eval()  # no dropout: on-policy ratios are 1 up to precision (fp32 actors vs bf16 learner)
        self.store = CheckpointStore(run_url(cfg), checkpoint_storage(cfg))
        self.data = DataState()
        self.state = TrainState(step=0, reader=self.data)

    @property
    def rank0(self) -> bool:
        return self.ctx.rank == 0

    def restore(self) -> Optional[int]:
        """Collective: resume from the newest committed checkpoint rank 0 finds; its step or None."""
        ref = agreed_resume_point(self.store, self.ctx.rank)
        if ref is None:
            return None
        restore_checkpoint(self.store, ref, self.strategy, {"policy": self.engine}, self.state, rank=self.ctx.rank,
                           world_size=self.ctx.world_size, run_name=self.cfg.run_name)
        return ref.step

    def publish(self) -> tuple[int, Any, float]:
        """Collective: (version, handle for the rollout actors (rank 0; None elsewhere), seconds)."""
        t = time.perf_counter()
        if self.strategy.is_partitioned(self.engine):
            sd = self.strategy.gathered_state_dict(self.engine)  # collective; {} on ranks > 0
        else:  # the object store copies: no clone needed here
            sd = {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()} if self.rank0 else {}
        handle = self.publisher.publish(sd, self.state.step) if self.rank0 else None
        return self.state.step, handle, time.perf_counter() - t

    def update(self, batch: Rollouts) -> dict[str, float]:
        """Collective: one GRPO step on this rank's share of the batch; metrics averaged over ranks
        (rank 0 replaces the batch-level ones, rewards and advantages, by whole-batch values)."""
        o, t, s = self.cfg.optim, time.perf_counter(), self.state.step
        f = lr_factor(s, warmup_steps=o.warmup_steps, max_steps=self.cfg.train.max_steps,
                      min_ratio=o.min_lr / o.lr, schedule=o.schedule)
        self.strategy.set_lr(self.engine, o.lr * f)
        batch = batch.to(self.ctx.device)
        with self.strategy.autocast(self.engine):
            loss, m = vapi_loss(self.engine.module, batch, self.vcfg.grpo, self.reference)
        self.strategy.backward(self.engine, loss)
        self.strategy.step(self.engine)
        self.state.step = s + 1
        meter = Meter()  # the trainer's rank mean (equal shares: the mean of the means)
        meter.add({"loss": loss, **m})
        meter.count = 1
        out = meter.reduce(self.ctx.device, self.ctx.world_size)
        out.update(lr=o.lr * f, update_s=time.perf_counter() - t)
        return out

    def save(self, data_state: dict) -> str:
        """Collective: commit checkpoint `state.step` (rank 0's `data_state` goes with it)."""
        self.data.state = data_state if self.rank0 else {}
        ref = commit_checkpoint(self.store, self.strategy, {"policy": self.engine}, self.state, rank=self.ctx.rank,
                                world_size=self.ctx.world_size, barrier=barrier, run_name=self.cfg.run_name,
                                keep_last=self.cfg.checkpoint.keep_last)
        return ref.url


def _scatter(parts: Optional[list[Rollouts]], ctx: WorkerContext) -> Rollouts:
    """Rank 0's batch split by images over the ranks; each rank returns its share."""
    if ctx.world_size == 1:
        return Rollouts.cat(parts)
    shares = Rollouts.cat(parts).to("cpu").split(ctx.world_size) if ctx.rank == 0 else None
    box: list = [None]
    dist.scatter_object_list(box, shares, src=0)
    return box[0]


def heldout_batch(cfg) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The first `method.heldout_images` validation images (None when off or no `data.val_url`)."""
    n = cfg.method.heldout_images
    if not n or not cfg.data.val_url:
        return None
    from system.data.reader import ShardReader

    d = cfg.data
    r = ShardReader(d.val_url, rank=0, world_size=1, batch_size=n, resolution=d.resolution, num_workers=0,
                    seed=cfg.seed, random_flip=False, storage=d.storage)
    b = next(iter(r))
    return b["image"], b["label"]


def _record_session(store: CheckpointStore, submission: str, start_step: int, world_size: int) -> None:
    old = (store.read_bytes(SESSIONS_FILE) or b"").decode()
    row = {"submission": submission, "start_step": start_step, "world_size": world_size, "time": time.time()}
    store.write_bytes(SESSIONS_FILE, (old + json.dumps(row) + "\n").encode())


def vapi_learner_worker(cfg, ctx: WorkerContext, rollouts: RolloutClient, publisher: WeightPublisher,
                        parts_fn: PartsFn, submission: str,
                        reader_factory: Optional[Callable[[Any, int, int], Any]] = None) -> None:
    """The learner loop of one rank (see the module docstring) to `train.max_steps` iterations."""
    cfg_m, bs, rank0 = cfg.method, cfg.data.batch_size, ctx.rank == 0
    learner = GRPOLearner(cfg, ctx, parts_fn, publisher)
    resumed = learner.restore()
    step = learner.state.step
    data_state = learner.data.state if rank0 else {}
    store = learner.store
    it = heldout = None
    trained: list[int] = list(data_state.get("groups", []))
    if rank0:
        _record_session(store, submission, step, ctx.world_size)
        if resumed is not None:
            print(f"[{cfg.run_name}] learner resumed from step {resumed}", flush=True)
        reader = (reader_factory or default_reader)(cfg, 0, 1)  # rank 0 reads for the whole pool
        if data_state.get("reader"):
            reader.load_state_dict(data_state["reader"])
        it = iter(reader)
        heldout = heldout_batch(cfg)
    logger = RunLogger(cfg, store, start_step=step, enabled=rank0)
    version, handle, pub_s = learner.publish()
    first = data_state.get("heldout_start")
    if rank0 and heldout is not None and step == 0:
        first = rollouts.heldout(version, handle, *heldout)
    reissued_before = int(data_state.get("rollout_reissued", 0))
    gids = lambda s: torch.arange(s * bs, (s + 1) * bs)  # noqa: E731 - global group ids of iteration s

    def start(s: int) -> dict:  # rank 0: roll out iteration s with the newest published weights
        pending = rollouts.submit(version, handle, next(it), gids(s), cfg.seed)
        pending["publish_s"] = pub_s
        return pending

    pending = start(step) if rank0 and step < cfg.train.max_steps else None
    last: dict = {}
    while step < cfg.train.max_steps:
        t0 = time.perf_counter()
        parts = stats = None
        reader_state: dict = {}
        nxt = None
        if rank0:
            parts, stats = rollouts.gather(pending)
            t_done = time.perf_counter()
            groups = torch.cat([p.group_ids.unique() for p in parts]).tolist()
            if sorted(groups) != gids(step).tolist():
                raise RuntimeError(f"step {step}: rollouts cover groups {sorted(groups)}, expected {gids(step).tolist()}")
            reader_state = reader.state_dict()  # position after the batch of `step` (the next is not read yet)
            if cfg_m.off_policy and step + 1 < cfg.train.max_steps:  # k+1 rolls out while k updates
                nxt = start(step + 1)
        t_wait = time.perf_counter() - t0
        t1 = time.perf_counter()
        metrics = learner.update(_scatter(parts, ctx))
        t_upd = time.perf_counter() - t1
        step = learner.state.step
        t2 = time.perf_counter()
        version, handle, pub_s = learner.publish()
        t_pub = time.perf_counter() - t2
        logger.step()
        maybe_crash(cfg, store, ctx.rank, step)  # fault injection (fault.crash_at_step / crash_rank)
        if rank0:
            if not cfg_m.off_policy and step < cfg.train.max_steps:
                nxt = start(step)
            trained += groups
            last = {**metrics, **_batch_stats(Rollouts.cat(parts), learner.vcfg.grpo),
                    "staleness": step - 1 - pending["version"],  # update step-1 ran on weights of version step-1
                    "iter_s": time.perf_counter() - t0, "rollout_wait_s": t_wait, "update_wall_s": t_upd,
                    "rollout_wall_s": t_done - pending["t_submit"], "publish_s": t_pub,
                    # publish of the version these rollouts used + the slowest actor's fetch and load
                    "weight_sync_s": pending["publish_s"] + max(s["sync_s"] for s in stats),
                    "sample_s": max(s.get("sample_s", 0.0) for s in stats),
                    "reward_s": max(s.get("reward_s", 0.0) for s in stats),
                    "rollout_reissued": reissued_before + rollouts.reissued}
            last["rollout_tokens_per_s"] = last.pop("tokens") / max(last["rollout_wall_s"], 1e-9)
            if step % cfg.logging.log_every == 0 or step == cfg.train.max_steps:
                logger.log(step, last)
        pending = nxt
        if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.max_steps:
            url = learner.save({"reader": reader_state, "groups": trained, "heldout_start": first,
                                "rollout_reissued": reissued_before + rollouts.reissued})
            logger.flush()
            ctx.report({"step": step, **last}, url)
    final = rollouts.heldout(version, handle, *heldout) if rank0 and heldout is not None else None
    if rank0:
        result = {"step": step, "groups": trained, "heldout_start": first, "heldout_end": final,
                  "rollout_reissued": reissued_before + rollouts.reissued}
        store.write_bytes(RESULT_FILE, json.dumps(result).encode())
    logger.summary({"step": step, "heldout_reward_start": first, "heldout_reward_end": final})
    logger.close()
    barrier()


def _batch_stats(batch: Rollouts, grpo) -> dict[str, float]:
    """Whole-batch statistics (rank 0, before the scatter): rewards and group advantages."""
    adv = group_advantages(batch.rewards, batch.group_ids, grpo.adv_eps, grpo.adv_clip)
    return {"reward_mean": float(batch.rewards.mean()), "reward_std": float(batch.rewards.std()),
            "mse": float(batch.mse.mean()), "lpips": float(batch.lpips.mean()), "adv_mean": float(adv.mean()),
            "adv_std": float(adv.std()), "adv_abs_max": float(adv.abs().max()), "tokens": float(batch.tokens.numel())}
