"""VAπ's rollout side: what each rollout actor holds and computes, and how rank 0 feeds the learner.

- `rollout`: one teacher-forced forward of the policy over an image's (optionally noised)
  ground-truth codes, G sequences per image sampled position-wise from those logits, each decoded
  by the frozen tokenizer and scored with reward = -(w_mse MSE + w_lpips LPIPS) (`Rollouts`).
- `RolloutWorker`: the plain worker each actor of the pool holds (policy copy + frozen decoder +
  LPIPS): `load_weights` (the learner's newest policy), `run` (one chunk of images under a seed),
  `probe` (the held-out teacher-forced reward).
- `VapiFeeder`: rank 0 reads each iteration's images, cuts them into one chunk per actor (each
  with its global group ids and its own seed, so a re-issued chunk gives the same samples) and
  combines the chunks' rollouts into the learner's batch (+ whole-batch statistics).
- `VapiRollouts`: the `ActorFedSource` VAπ registers (system/methods/vapi.py): its rules, actors,
  worker, feeder, scatter by whole groups, and the held-out probe. cluster/rollout_pool.py binds it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from system.config import VapiConfig
from system.data.sources import ActorFedSource, ActorSpec, DataSpec
from system.losses.lpips import LPIPS
from system.methods.grpo import GRPOConfig, group_advantages
from system.models.artifacts import Generator, Tokenizer, check_fit
from system.sampling.generators import load_llamagen, load_pair

# why VAπ refuses a masked generator (system/methods/vapi.py check_config, load_parts)
MASKED_POLICY = ("is a masked (bidirectional) generator, e.g. SemTok's masked AR: VAπ's rollout samples every "
                 "position from one teacher-forced forward (p(x_i | x_<i), the ground-truth prefix), which is "
                 "undefined for a masked model (it predicts hidden positions from the whole sequence); post-train "
                 "a causal (next-token) generator")


# ---------------------------------------------------------------------------- rollouts
@dataclass
class RolloutConfig:
    """What a rollout actor needs (built from the method's `VapiConfig` by `rollout_config`)."""

    group_size: int = 8
    noise_p: float = 0.0  # contextual noise: replace each teacher-forced input by a uniform token w.p. p
    temperature: float = 1.0
    w_mse: float = 1.0
    w_lpips: float = 1.0
    decode_chunk: int = 64  # sequences decoded + scored per chunk
    grpo: GRPOConfig = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.grpo is None:
            self.grpo = GRPOConfig()
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are normalised within a group); got {self.group_size}")
        if not 0.0 <= self.noise_p <= 1.0:
            raise ValueError(f"noise_p is a probability in [0, 1]; got {self.noise_p}")


@dataclass
class Rollouts:
    """One batch of rollouts: B images x G samples (N = B*G rows, image-major)."""

    inputs: Tensor  # (B, L) teacher-forced input ids (noised ground truth)
    gt_tokens: Tensor  # (B, L)
    labels: Tensor  # (B,)
    tokens: Tensor  # (N, L) sampled ids
    logp: Tensor  # (N, L) log-probs under the sampling policy
    rewards: Tensor  # (N,)
    group_ids: Tensor  # (N,) the image's global group id
    image_index: Tensor  # (N,) row of `inputs` each sample belongs to
    mse: Tensor  # (N,)
    lpips: Tensor  # (N,)

    def to(self, device) -> "Rollouts":
        return Rollouts(**{k: v.to(device) for k, v in self.__dict__.items()})

    @staticmethod
    def cat(parts: list["Rollouts"]) -> "Rollouts":
        off, rows = 0, []
        for p in parts:
            rows.append(p.image_index + off)
            off += p.inputs.shape[0]
        d = {k: torch.cat([getattr(p, k) for p in parts]) for k in Rollouts.__dataclass_fields__ if k != "image_index"}
        return Rollouts(image_index=torch.cat(rows), **d)

    def split(self, n: int) -> list["Rollouts"]:
        """`n` parts with equal numbers of images, each image with all its samples (a group never
        straddles two parts, so advantages are unchanged): one part per learner rank."""
        b = self.inputs.shape[0]
        if b % n:
            raise ValueError(f"{b} images cannot be split evenly over {n} learner ranks")
        per, parts = b // n, []
        for r in range(n):
            keep = (self.image_index >= r * per) & (self.image_index < (r + 1) * per)
            rows = {k: getattr(self, k)[r * per:(r + 1) * per] for k in ("inputs", "gt_tokens", "labels")}
            samples = {k: getattr(self, k)[keep] for k in ("tokens", "logp", "rewards", "group_ids", "mse", "lpips")}
            parts.append(Rollouts(image_index=self.image_index[keep] - r * per, **rows, **samples))
        return parts


def noise_tokens(tokens: Tensor, p: float, vocab: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Replace each id (B, L) by a uniform random id with probability p."""
    if p <= 0:
        return tokens
    u = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    rnd = torch.randint(0, vocab, tokens.shape, generator=generator, device=tokens.device)
    return torch.where(u < p, rnd, tokens)


def pixel_reward(images: Tensor, real: Tensor, lpips: Optional[LPIPS], w_mse: float, w_lpips: float
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(reward, mse, lpips), each (B,): reward = -(w_mse MSE + w_lpips LPIPS)."""
    mse = F.mse_loss(images.float(), real.float(), reduction="none").mean(dim=(1, 2, 3))
    lp = lpips(images, real).float() if (lpips is not None and w_lpips > 0) else torch.zeros_like(mse)
    return -(w_mse * mse + w_lpips * lp), mse, lp


@torch.no_grad()
def rollout(policy: Generator, tokenizer: Tokenizer, lpips: Optional[LPIPS], images: Tensor, labels: Tensor,
            group_ids: Tensor, cfg: RolloutConfig, generator: torch.Generator,
            gt_tokens: Optional[Tensor] = None, timings: Optional[dict] = None) -> Rollouts:
    """Rollouts for real images (B, 3, H, W), labels (B,), global group ids (B,): G samples each.
    `timings` (if given) receives seconds of "sample_s" (encode + forward + sampling) and "reward_s"
    (decode + reward)."""
    t0 = time.perf_counter()
    b, g = images.shape[0], cfg.group_size
    gt = tokenizer.encode(images) if gt_tokens is None else gt_tokens  # (B, L)
    inputs = noise_tokens(gt, cfg.noise_p, policy.vocab_size, generator)
    logits = policy(inputs, labels).float() / cfg.temperature  # (B, L, V)
    logp_all = logits.log_softmax(-1)
    l, v = logits.shape[1], logits.shape[2]
    samples = torch.multinomial(logp_all.exp().reshape(b * l, v), g, replacement=True, generator=generator)  # (B*L, G)
    tokens = samples.view(b, l, g).permute(0, 2, 1).reshape(b * g, l)  # (N, L)
    image_index = torch.arange(b, device=images.device).repeat_interleave(g)
    logp = logp_all[image_index].gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (N, L)
    t1 = time.perf_counter()
    rewards, mses, lps = [], [], []
    for s in range(0, b * g, cfg.decode_chunk):
        idx = image_index[s:s + cfg.decode_chunk]
        r, m, p = pixel_reward(tokenizer.decode(tokens[s:s + cfg.decode_chunk]), images[idx], lpips, cfg.w_mse, cfg.w_lpips)
        rewards.append(r), mses.append(m), lps.append(p)
    if timings is not None:
        timings["sample_s"] = timings.get("sample_s", 0.0) + t1 - t0
        timings["reward_s"] = timings.get("reward_s", 0.0) + time.perf_counter() - t1
    return Rollouts(inputs=inputs, gt_tokens=gt, labels=labels, tokens=tokens, logp=logp, rewards=torch.cat(rewards),
                    group_ids=group_ids[image_index], image_index=image_index, mse=torch.cat(mses), lpips=torch.cat(lps))


@torch.no_grad()
def heldout_reward(policy: Generator, tokenizer: Tokenizer, lpips: Optional[LPIPS], images: Tensor,
                   labels: Tensor, cfg: RolloutConfig, seed: int = 0) -> float:
    """Mean reward of teacher-forced rollouts on held-out images (fixed seed): the eval signal."""
    gen = torch.Generator(device=images.device).manual_seed(seed)
    ids = torch.arange(images.shape[0], device=images.device)
    return float(rollout(policy, tokenizer, lpips, images, labels, ids, cfg, gen).rewards.mean())


def load_parts(export_url: Optional[str] = None, llamagen_gpt: Optional[str] = None, llamagen_vq: Optional[str] = None,
               lpips_vgg: Optional[str] = None, lpips_lin: Optional[str] = None, use_lpips: bool = True,
               storage=None, llamagen_preset: Optional[str] = None, **gpt_overrides
               ) -> tuple[Generator, Tokenizer, Optional[LPIPS]]:
    """(policy, frozen tokenizer, LPIPS) from an export of ours (any registered kinds) or LlamaGen
    checkpoint paths (CPU); the policy's AR model is trainable, in eval mode."""
    if export_url and not (llamagen_gpt or llamagen_vq):
        tok, policy = load_pair(export_url, storage)
    elif llamagen_gpt and llamagen_vq and not export_url:
        tok, policy = load_llamagen(llamagen_gpt, llamagen_vq, llamagen_preset, **gpt_overrides)
    else:
        raise ValueError("give either method.export_url (a run's export/ folder) or both method.llamagen_gpt and "
                         f"method.llamagen_vq (checkpoint paths); got export_url={export_url!r}, "
                         f"llamagen_gpt={llamagen_gpt!r}, llamagen_vq={llamagen_vq!r}")
    if policy.masked:
        raise ValueError(f"method.export_url = {export_url!r}: its AR model {MASKED_POLICY}")
    lp = LPIPS(lpips_vgg, lpips_lin) if use_lpips else None
    return policy, tok, lp


def rollout_config(m: VapiConfig) -> RolloutConfig:
    """The rollout and GRPO settings of the method's config (one temperature for both sides)."""
    return RolloutConfig(group_size=m.group_size, noise_p=m.noise_p, temperature=m.temperature, w_mse=m.w_mse,
                         w_lpips=m.w_lpips, grpo=GRPOConfig(clip_eps=m.clip_eps, adv_clip=m.adv_clip, adv_eps=m.adv_eps,
                                                            beta=m.beta, kl=m.kl, temperature=m.temperature))


def exported_policy_state(export_url: str, storage=None) -> dict[str, Tensor]:
    """The post-trained policy of a VAπ export as a `GPTGenerator` state dict ("ar.*" keys)."""
    from system.models.artifacts import load_part

    return {f"ar.{k}": v for k, v in load_part(export_url, "ar", storage, ema=False).items()}


def default_parts(exp: Any) -> tuple:
    """(policy, frozen tokenizer, LPIPS or None) from `exp.method`, checked against `data.resolution`."""
    m = exp.method
    policy, tok, lp = load_parts(m.export_url, m.llamagen_gpt, m.llamagen_vq, m.lpips_net.vgg_path, m.lpips_net.lin_path,
                                 use_lpips=m.w_lpips > 0, storage=exp.data.storage, llamagen_preset=m.llamagen_preset,
                                 **m.gpt_overrides)
    check_fit(policy, tok, exp.data.resolution)
    return policy, tok, lp


PartsFn = Callable[[Any], tuple]  # experiment -> (policy, frozen tokenizer, LPIPS | None)


# ---------------------------------------------------------------------------- the actors' worker
class RolloutWorker:
    """Policy copy + frozen decoder + LPIPS (plain class: cluster/ binds it to an actor)."""

    def __init__(self, exp: Any, parts_fn: PartsFn = default_parts, fault_dir: Optional[str] = None):
        m = exp.method
        torch.set_num_threads(max(1, int(m.cpus_per_rollout_worker)))
        self.device = torch.device("cuda" if m.gpus_per_rollout_worker > 0 and torch.cuda.is_available() else "cpu")
        policy, tok, lp = parts_fn(exp)
        self.policy, self.tok = policy.to(self.device).eval(), tok.to(self.device)
        self.lpips = lp.to(self.device) if lp is not None else None
        self.vcfg = rollout_config(m)
        self.crash_at, self.fault_dir, self.calls = m.crash_rollout_at_call, fault_dir, 0

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

    def load_weights(self, state_dict: dict[str, Tensor]) -> None:
        self.policy.load_state_dict(state_dict, strict=True)

    def run(self, chunk: dict[str, Tensor], seed: int) -> tuple[Rollouts, dict]:
        """Rollouts of one chunk ({"image", "label", "group_ids"}: global group ids) seeded by `seed`."""
        self._maybe_crash()
        gen = torch.Generator(device=self.device).manual_seed(seed)
        tm: dict = {}
        d = self.device
        ro = rollout(self.policy, self.tok, self.lpips, chunk["image"].to(d), chunk["label"].to(d),
                     chunk["group_ids"].to(d), self.vcfg, gen, timings=tm)
        return ro.to("cpu"), {**tm, "pid": os.getpid()}

    def probe(self, images: Tensor, labels: Tensor) -> float:
        """Mean teacher-forced rollout reward on held-out images (fixed seed)."""
        return heldout_reward(self.policy, self.tok, self.lpips, images.to(self.device), labels.to(self.device), self.vcfg)


# ---------------------------------------------------------------------------- rank 0's feeder
def batch_stats(batch: Rollouts, adv_eps: float, adv_clip: float) -> dict[str, float]:
    """Whole-batch statistics (rank 0, before the scatter): rewards and group advantages."""
    adv = group_advantages(batch.rewards, batch.group_ids, adv_eps, adv_clip)
    return {"reward_mean": float(batch.rewards.mean()), "reward_std": float(batch.rewards.std()),
            "mse": float(batch.mse.mean()), "lpips": float(batch.lpips.mean()), "adv_mean": float(adv.mean()),
            "adv_std": float(adv.std()), "adv_abs_max": float(adv.abs().max())}


def _chunks(n: int, k: int) -> list[slice]:
    size = -(-n // k)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def image_reader(exp: Any):
    """Rank 0 reads the images of every iteration for the whole pool."""
    from system.data.stream import ShardReader

    return ShardReader.from_config(exp.data, rank=0, world_size=1, seed=exp.seed)


class VapiFeeder:
    """Rank 0: iteration s is `data.batch_size` images (global group ids s*B .. s*B+B-1) in one chunk
    per actor, chunk seed = `seed` + its first group id. State: the reader position after the last
    combined iteration and the group ids trained so far."""

    def __init__(self, exp: Any, reader: Any):
        self.exp, self.reader, self.it = exp, reader, None
        self.groups: list[int] = []
        self.reader_state: dict = {}

    def _gids(self, s: int) -> Tensor:
        bs = self.exp.data.batch_size
        return torch.arange(s * bs, (s + 1) * bs)

    def items(self, step: int) -> list[tuple]:
        if self.it is None:
            self.it = iter(self.reader)
        batch, gids = next(self.it), self._gids(step)
        return [({"image": batch["image"][sl], "label": batch["label"][sl], "group_ids": gids[sl]},
                 self.exp.seed + int(gids[sl][0])) for sl in _chunks(len(gids), self.exp.method.num_rollout_workers)]

    def combine(self, step: int, results: list[Rollouts], timing: dict[str, float]) -> dict:
        ro = Rollouts.cat(results)
        groups = ro.group_ids.unique().tolist()
        if sorted(groups) != self._gids(step).tolist():
            raise RuntimeError(f"step {step}: rollouts cover groups {sorted(groups)}, expected {self._gids(step).tolist()}")
        self.groups += groups
        self.reader_state = self.reader.state_dict()  # after the batch of `step` (the next is not read yet)
        m = self.exp.method
        stats = {**batch_stats(ro, m.adv_eps, m.adv_clip), **timing,
                 "rollout_tokens_per_s": ro.tokens.numel() / max(timing.get("rollout_wall_s", 0.0), 1e-9)}
        return {"rollouts": ro, "stats": stats}

    def state_dict(self) -> dict:
        return {"reader": self.reader_state, "groups": list(self.groups)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("reader"):
            self.reader.load_state_dict(state["reader"])
        self.groups = list(state.get("groups", []))

    def summary(self) -> dict:
        return {**self.state_dict(), "groups_trained": len(self.groups)}


# ---------------------------------------------------------------------------- the source
@dataclass
class VapiRollouts(ActorFedSource):
    """VAπ trains on rollouts: rank 0 reads `data.url`'s images, the rollout actors (policy copy,
    frozen decoder, reward) turn each into a group of samples with rewards. `parts_fn` builds an
    actor's (policy, tokenizer, LPIPS) from the experiment; `reader` rank 0's image reader."""

    parts_fn: PartsFn = default_parts
    reader: Callable[[Any], Any] = image_reader

    publish_module = "policy"
    probe_name = "heldout"  # the held-out teacher-forced reward: metrics heldout_start / heldout_end
    probe_file = "vapi_heldout.json"  # the reward before training, kept across resubmissions

    def check(self, exp: Any) -> None:
        """Rules that tie the method to the infra sections, then the image shards (before Ray)."""
        from system.data.sources import ImageShards
        from system.data.storage import protocol

        m = exp.method
        if exp.data.batch_size < 1:
            raise ValueError(f"data.batch_size={exp.data.batch_size}: images (groups) per iteration must be >= 1")
        if exp.optim.grad_accum != 1:
            raise ValueError(f"optim.grad_accum={exp.optim.grad_accum}: a VAπ iteration is one update on the whole "
                             "batch; set optim.grad_accum=1 and size the batch with data.batch_size")
        if m.crash_rollout_at_call is not None and protocol(exp.checkpoint.storage_path) != "file":
            raise ValueError("method.crash_rollout_at_call (fault injection) needs a local checkpoint.storage_path "
                             "(its once-per-run marker is a local file)")
        if exp.data.batch_size % exp.cluster.num_workers:
            raise ValueError(f"data.batch_size={exp.data.batch_size} images per iteration must split evenly over "
                             f"cluster.num_workers={exp.cluster.num_workers} learner ranks")
        ImageShards(readers=1).check(exp)  # rank 0 reads every iteration's images (`image_reader`)

    def resolve(self, exp: Any) -> DataSpec:
        return DataSpec(resolution=exp.data.resolution, num_classes=0, storage=exp.data.storage)  # the policy knows its classes

    def actors(self, exp: Any) -> ActorSpec:
        m = exp.method
        return ActorSpec(m.num_rollout_workers, m.cpus_per_rollout_worker, m.gpus_per_rollout_worker, m.rollout_max_restarts)

    def worker(self, exp: Any, fault_dir: Optional[str] = None) -> Callable[[], RolloutWorker]:
        import functools

        return functools.partial(RolloutWorker, exp, self.parts_fn, fault_dir)

    def overlap(self, exp: Any) -> bool:
        return exp.method.off_policy  # one-step off-policy: rollouts of k+1 overlap the update of k

    def feeder(self, exp: Any) -> VapiFeeder:
        return VapiFeeder(exp, self.reader(exp))

    def shares(self, batch: dict, world_size: int) -> list[dict]:
        """By images, each with all its samples (a group never straddles two ranks)."""
        return [{"rollouts": r, "stats": batch["stats"]} for r in batch["rollouts"].to("cpu").split(world_size)]

    def probe_input(self, exp: Any) -> Optional[tuple[Tensor, Tensor]]:
        """The first `method.heldout_images` validation images (None when off or no `data.val_url`)."""
        n = exp.method.heldout_images
        if not n or not exp.data.val_url:
            return None
        from system.data.stream import ShardReader

        d = exp.data
        r = ShardReader(d.val_url, rank=0, world_size=1, batch_size=n, resolution=d.resolution, num_workers=0,
                        seed=exp.seed, random_flip=False, storage=d.storage)
        b = next(iter(r))
        return b["image"], b["label"]

    def start_weights(self, exp: Any) -> dict:
        return self.parts_fn(replace(exp, method=replace(exp.method, w_lpips=0.0)))[0].state_dict()

    def final_weights(self, exp: Any, export_url: str) -> dict:
        return exported_policy_state(export_url, exp.data.storage)
