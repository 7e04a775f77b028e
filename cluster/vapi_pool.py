"""VAπ on Ray: a rollout pool of plain actors (placement group) and a GRPO learner on DeepSpeed.

Per iteration: the learner publishes its weights (`WeightPublisher`, object store) -> rollout
actors load them -> rollouts for a batch of images (groups spread over the actors) -> learner
update. Sync on-policy by default; `method.off_policy` overlaps rollouts of k+1 with update k
(staleness logged). A dead rollout actor is restarted by Ray (max_restarts) and its chunk
re-issued with the same seed, so every group id is trained exactly once. The learner is ONE Ray
actor driving `DeepSpeedStrategy` (world size 1, not a Ray Train pool); it checkpoints through
`CheckpointStore` with the data position and trained group ids, and a lost learner is re-created
and resumes from its last committed checkpoint.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

import ray

import torch

from system.methods.grpo import GRPOConfig
from system.methods.vapi import Rollouts, VapiConfig, heldout_reward, load_parts, rollout, vapi_loss

PartsFn = Callable[[Any], tuple]  # cfg -> (VapiPolicy, FrozenTokenizer, LPIPS | None)


def default_parts(cfg) -> tuple:
    m = cfg.method
    if not (m.lpips_net.vgg_path or m.lpips_net.random_init) and m.w_lpips > 0:
        raise ValueError("method.w_lpips > 0 needs method.lpips_net.vgg_path/lin_path (or random_init=true for a demo)")
    return load_parts(m.export_url, m.llamagen_gpt, m.llamagen_vq, m.lpips_net.vgg_path, m.lpips_net.lin_path,
                      use_lpips=m.w_lpips > 0, storage=cfg.data.storage, **m.gpt_overrides)


def vapi_config(cfg) -> VapiConfig:
    m = cfg.method
    return VapiConfig(group_size=m.group_size, noise_p=m.noise_p, temperature=m.temperature, w_mse=m.w_mse,
                      w_lpips=m.w_lpips, grpo=GRPOConfig(clip_eps=m.clip_eps, adv_clip=m.adv_clip, beta=m.beta, kl=m.kl))


# ---------------------------------------------------------------------------- weight publication
class WeightPublisher:
    """How the learner's weights reach the rollout actors. `publish` runs in the learner and
    returns a small handle; `fetch` runs in an actor. A GPU collective broadcast fits the same API."""

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> Any:
        raise NotImplementedError

    def fetch(self, handle: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class ObjectStorePublisher(WeightPublisher):
    """`ray.put` the state dict once; each actor `ray.get`s it (zero-copy reads on one node)."""

    def publish(self, state_dict, version):
        return [ray.put(state_dict)]  # wrapped: Ray must not resolve it before the actor times the fetch

    def fetch(self, handle):
        return ray.get(handle[0])


# ---------------------------------------------------------------------------- workers (plain classes)
class RolloutWorker:
    """Policy copy + frozen decoder + LPIPS; `run` loads newer weights, then rolls out one chunk."""

    def __init__(self, cfg, parts_fn: PartsFn, publisher: WeightPublisher, fault_dir: Optional[str] = None):
        torch.set_num_threads(max(1, int(cfg.method.cpus_per_rollout_worker)))
        self.device = torch.device("cuda" if cfg.method.gpus_per_rollout_worker > 0 and torch.cuda.is_available() else "cpu")
        policy, tok, lp = parts_fn(cfg)
        self.policy, self.tok = policy.to(self.device).eval(), tok.to(self.device)
        self.lpips = lp.to(self.device) if lp is not None else None
        self.vcfg, self.publisher, self.version = vapi_config(cfg), publisher, -1
        self.crash_at, self.fault_dir, self.calls = cfg.method.crash_rollout_at_call, fault_dir, 0

    def _maybe_crash(self) -> None:
        self.calls += 1
        if self.crash_at is None or self.fault_dir is None or self.calls != self.crash_at:
            return
        os.makedirs(self.fault_dir, exist_ok=True)
        try:  # atomic: exactly one actor of the pool dies, once per run
            os.close(os.open(os.path.join(self.fault_dir, "rollout_crash"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        print(f"[fault] rollout actor pid {os.getpid()} dies at call {self.calls}", flush=True)
        os._exit(1)

    def ping(self) -> int:
        return os.getpid()

    def _sync(self, version: int, handle: Any) -> float:
        """Load the published weights of `version` unless already held; seconds spent."""
        if version == self.version:
            return 0.0
        t = time.perf_counter()
        self.policy.load_state_dict(self.publisher.fetch(handle), strict=True)
        self.version = version
        return time.perf_counter() - t

    def run(self, version: int, handle: Any, images: torch.Tensor, labels: torch.Tensor, group_ids: torch.Tensor,
            seed: int) -> tuple[Rollouts, dict]:
        """Rollouts of one chunk of images (global group ids) under weights `version`, seeded by `seed`."""
        self._maybe_crash()
        sync = self._sync(version, handle)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        tm: dict = {}
        ro = rollout(self.policy, self.tok, self.lpips, images.to(self.device), labels.to(self.device),
                     group_ids.to(self.device), self.vcfg, gen, timings=tm)
        return ro.to("cpu"), {"sync_s": sync, **tm, "version": self.version, "pid": os.getpid()}

    def heldout(self, version: int, handle: Any, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Mean teacher-forced rollout reward on held-out images under weights `version` (fixed seed)."""
        self._sync(version, handle)
        return heldout_reward(self.policy, self.tok, self.lpips, images.to(self.device), labels.to(self.device), self.vcfg)


class DataState:
    """What the learner checkpoints about the data: reader position and trained group ids."""

    def __init__(self) -> None:
        self.state: dict = {}

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


class LearnerWorker:
    """GRPO learner on one process: the policy as a DeepSpeed engine (`cluster.engine`), checkpoints
    via `cluster.checkpoint` into `<storage_path>/<run_name>`."""

    def __init__(self, cfg, parts_fn: PartsFn, publisher: WeightPublisher):
        import torch.distributed as dist

        from cluster.checkpoint import CheckpointStore, TrainState
        from cluster.engine import DeepSpeedStrategy
        from cluster.worker_loop import checkpoint_storage, run_url
        from system.train_utils import seed_everything

        if not dist.is_initialized():  # DeepSpeed needs a process group, even of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("LOCAL_RANK", "0")
            dist.init_process_group("gloo", rank=0, world_size=1)
        seed_everything(cfg.seed)
        self.cfg, self.publisher, self.vcfg = cfg, publisher, vapi_config(cfg)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        policy, _, _ = parts_fn(cfg)
        self.reference = None
        if cfg.method.kl > 0:
            import copy

            self.reference = copy.deepcopy(policy).to(device).eval().requires_grad_(False)
        o = cfg.optim
        self.strategy = DeepSpeedStrategy(cfg.deepspeed, o, device, micro_batch_size=1, world_size=1)
        self.engine = self.strategy.prepare(policy, lr=o.lr, betas=tuple(o.betas))
        self.engine.module.eval()  # no dropout: ratios are exactly 1 on-policy
        self.store = CheckpointStore(run_url(cfg), checkpoint_storage(cfg))
        self.data = DataState()
        self.state = TrainState(step=0, reader=self.data)
        self.version = 0

    def restore(self) -> tuple[int, dict]:
        """Resume from the newest complete checkpoint: (step, data state); (0, {}) when none."""
        from cluster.checkpoint import restore_checkpoint

        ref = self.store.latest_complete()
        self.store.remove_incomplete(after=ref.step if ref else -1)
        if ref is None:
            return 0, {}
        restore_checkpoint(self.store, ref, self.strategy, {"policy": self.engine}, self.state, rank=0, world_size=1,
                           run_name=self.cfg.run_name)
        self.version = self.state.step
        return self.state.step, self.data.state

    def publish(self) -> tuple[int, Any, float]:
        t = time.perf_counter()
        if self.strategy.is_partitioned(self.engine):
            sd = self.strategy.gathered_state_dict(self.engine)
        else:  # ray.put copies into the object store: no clone needed here
            sd = {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}
        handle = self.publisher.publish(sd, self.version)
        return self.version, handle, time.perf_counter() - t

    def update(self, parts: list[Rollouts], step: int) -> dict:
        from system.train_utils import lr_factor

        o, t = self.cfg.optim, time.perf_counter()
        f = lr_factor(step, warmup_steps=o.warmup_steps, max_steps=self.cfg.train.max_steps,
                      min_ratio=o.min_lr / o.lr, schedule=o.schedule)
        self.strategy.set_lr(self.engine, o.lr * f)
        batch = Rollouts.cat(parts).to(self.strategy.device)
        with self.strategy.autocast(self.engine):
            loss, m = vapi_loss(self.engine.module, batch, self.vcfg.grpo, self.reference)
        self.strategy.backward(self.engine, loss)
        self.strategy.step(self.engine)
        self.version += 1
        self.state.step = step + 1
        out = {k: float(v) for k, v in m.items()}
        out.update(loss=float(loss.detach()), lr=o.lr * f, update_s=time.perf_counter() - t)
        if self.cfg.fault.crash_at_step is not None and self.state.step == self.cfg.fault.crash_at_step:
            if not self.store.exists(f"fault/learner_crash_{self.state.step:08d}"):
                self.store.write_bytes(f"fault/learner_crash_{self.state.step:08d}", b"1")
                print(f"[fault] learner dies after the update of step {self.state.step}", flush=True)
                os._exit(1)
        return out

    def save(self, data_state: dict) -> str:
        from cluster.checkpoint import commit_checkpoint

        self.data.state = data_state
        ref = commit_checkpoint(self.store, self.strategy, {"policy": self.engine}, self.state, rank=0, world_size=1,
                                barrier=lambda: None, run_name=self.cfg.run_name, keep_last=self.cfg.checkpoint.keep_last)
        return ref.url


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
