"""VAπ's rollout side on Ray: how weights reach the rollout actors (`WeightPublisher`), the
rollout actor's logic (`RolloutWorker`, a plain class), the pool that owns the actors
(`RolloutPool`, driver side: placement group, restartable actors) and the picklable
`RolloutClient` the learner's rank 0 uses to spread a batch over the actors and gather it.

A dead rollout actor is restarted by Ray (`method.rollout_max_restarts`) and its chunk re-issued
with the same seed to a live actor, so every group id comes back exactly once. The learner side
is cluster/vapi_learner.py; the driver cluster/vapi_run.py.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

import ray
import torch
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from system.methods.grpo import GRPOConfig
from system.methods.vapi import Rollouts, VapiConfig, check_fit, heldout_reward, load_parts, rollout

PartsFn = Callable[[Any], tuple]  # cfg -> (VapiPolicy, FrozenTokenizer, LPIPS | None)


def default_parts(cfg) -> tuple:
    """(policy, frozen tokenizer, LPIPS or None) from `cfg.method`, checked against `data.resolution`."""
    m = cfg.method
    policy, tok, lp = load_parts(m.export_url, m.llamagen_gpt, m.llamagen_vq, m.lpips_net.vgg_path, m.lpips_net.lin_path,
                                 use_lpips=m.w_lpips > 0, storage=cfg.data.storage, llamagen_preset=m.llamagen_preset,
                                 **m.gpt_overrides)
    check_fit(policy, tok, cfg.data.resolution)
    return policy, tok, lp


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
    """The state dict packed into one flat byte buffer and `ray.put` once; each actor `ray.get`s it
    (a read-only view on the node's shared memory, no deserialisation copy) and loads views of it.
    One large buffer instead of a pickle of many tensors: ~5x faster for a few MB of weights."""

    ALIGN = 64  # bytes

    def __init__(self) -> None:
        self._buf: Optional[torch.Tensor] = None  # reused staging buffer (a fresh one costs page faults)

    def publish(self, state_dict, version):
        meta, chunks, offset = [], [], 0
        for name, t in state_dict.items():
            flat = t.detach().cpu().contiguous().reshape(-1)
            n = flat.numel() * flat.element_size()
            offset = -(-offset // self.ALIGN) * self.ALIGN  # every tensor starts aligned for its dtype
            meta.append((name, t.dtype, tuple(t.shape), offset, n))
            chunks.append(flat.view(torch.uint8) if n else None)
            offset += n
        if self._buf is None or self._buf.numel() != offset:
            self._buf = torch.empty(offset, dtype=torch.uint8)
        for (_, _, _, off, n), c in zip(meta, chunks):
            if n:
                self._buf[off:off + n].copy_(c)
        # ray.put copies into the object store, so the buffer is free again on return. The ref is
        # wrapped in a list: Ray must not resolve it before the actor times its own fetch.
        return [ray.put({"version": version, "meta": meta, "buf": self._buf.numpy()})]

    def fetch(self, handle):
        import warnings

        obj = ray.get(handle[0])
        with warnings.catch_warnings():  # the buffer is read-only shared memory; we only read it
            warnings.simplefilter("ignore", UserWarning)
            buf = torch.from_numpy(obj["buf"])
        return {name: buf[off:off + n].view(dtype).view(shape) for name, dtype, shape, off, n in obj["meta"]}


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


# ---------------------------------------------------------------------------- the pool
def _chunks(n: int, k: int) -> list[slice]:
    size = -(-n // k)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class RolloutClient:
    """Handles to the rollout actors (picklable: the learner's rank 0 holds one). `submit` spreads
    one batch of images over the actors; `gather` waits for it. A chunk whose actor died is
    re-issued with the same seed (identical samples): first to the same actor, which Ray restarts
    and queues the task for, then to the others in turn. `reissued` counts re-issues."""

    def __init__(self, actors: list, max_reissue: int = 8):
        self.actors, self.max_reissue = actors, max_reissue
        self.reissued = 0

    def submit(self, version: int, handle: Any, batch: dict, group_ids: torch.Tensor, seed: int) -> dict:
        """Start the rollouts of `batch` (images, labels) as groups `group_ids` under weights
        `version`; chunk seeds derive from `seed` and the chunk's first group id."""
        tasks = []
        for i, sl in enumerate(_chunks(len(group_ids), len(self.actors))):
            a = i % len(self.actors)
            args = (version, handle, batch["image"][sl], batch["label"][sl], group_ids[sl], seed + int(group_ids[sl][0]))
            tasks.append((a, args, self.actors[a].run.remote(*args)))
        return {"version": version, "tasks": tasks, "t_submit": time.perf_counter()}

    def _get(self, a: int, method: str, args: tuple, ref: Any) -> Any:
        """`ray.get(ref)`; when its actor died, re-issue `method(*args)` (same actor, then the others)."""
        for attempt in range(self.max_reissue + 1):
            try:
                return ray.get(ref)
            except RayActorError:
                if attempt == self.max_reissue:
                    raise
                self.reissued += 1
                a = (a + attempt) % len(self.actors)  # same actor first (Ray restarts it), then the next ones
                print(f"[vapi] rollout actor lost during {method}; re-issuing it to actor {a}", flush=True)
                ref = getattr(self.actors[a], method).remote(*args)

    def gather(self, pending: dict) -> tuple[list[Rollouts], list[dict]]:
        """The rollouts of a `submit`, in chunk order, and each chunk's timings."""
        out = [self._get(a, "run", args, ref) for a, args, ref in pending["tasks"]]
        return [o[0] for o in out], [o[1] for o in out]

    def heldout(self, version: int, handle: Any, images: torch.Tensor, labels: torch.Tensor) -> float:
        args = (version, handle, images, labels)
        return self._get(0, "heldout", args, self.actors[0].heldout.remote(*args))


class RolloutPool:
    """Owns `method.num_rollout_workers` restartable `RolloutWorker` actors in one placement group
    (created by the driver, so they outlive learner restarts); `client()` is what the learner uses."""

    def __init__(self, cfg, parts_fn: PartsFn, publisher: WeightPublisher, fault_dir: Optional[str] = None,
                 timeout_s: float = 300.0):
        m = cfg.method
        bundle = {"CPU": m.cpus_per_rollout_worker, **({"GPU": m.gpus_per_rollout_worker} if m.gpus_per_rollout_worker else {})}
        self.pg = placement_group([bundle] * m.num_rollout_workers, strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise RuntimeError(f"the rollout pool's placement group ({m.num_rollout_workers} x {bundle}) was not "
                               f"placed within {timeout_s:.0f} s; lower method.num_rollout_workers or its resources")
        self.actors: list = []
        try:  # any failure below gives the placement group back, or the learner pool could wait for it forever
            cls = ray.remote(max_restarts=m.rollout_max_restarts, max_task_retries=0)(RolloutWorker)
            for i in range(m.num_rollout_workers):
                strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)
                self.actors.append(cls.options(num_cpus=m.cpus_per_rollout_worker, num_gpus=m.gpus_per_rollout_worker,
                                               scheduling_strategy=strategy).remote(cfg, parts_fn, publisher, fault_dir))
            ray.get([a.ping.remote() for a in self.actors])  # constructor errors surface here, not mid-run
        except BaseException:
            self.close()
            raise

    def client(self) -> RolloutClient:
        return RolloutClient(self.actors)

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)
