"""VAπ: pixel-space post-training of an AR image generator (../shared/seeds/vapi.txt).

Rollout: one teacher-forced forward of the policy over an image's (optionally noised) ground-truth
token prefix; G sequences per image sampled position-wise from those logits; each decoded by the
frozen tokenizer and scored with reward = -(w_mse MSE + w_lpips LPIPS) against the real image.
The GRPO update (system/methods/grpo.py) raises the log-probability of the better samples, with a
cross-entropy prior on the ground-truth tokens. Works with our 1D tokenizer + GPT (EOSTok/AliTok
exports) and LlamaGen's VQ-16 + c2i GPT, or any registered kinds, through the protocols of
system.models.artifacts (`Tokenizer`, `Generator`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from system.losses.lpips import LPIPS
from system.config import VapiConfig
from system.methods.base import DataSpec, Method, ModuleSpec, StepOutput
from system.methods.grpo import GRPOConfig, grpo_loss
from system.methods.registry import register
from system.models.artifacts import Artifact, Generator, Tokenizer, check_fit
from system.models.tokenizers import frozen_tokenizer  # noqa: F401 - old import path
from system.sampling.generators import load_llamagen, load_pair
from system.sampling.gpt_generator import GPTGenerator


# The policy is an AR generator + the codebook it embeds codes through (GPTGenerator,
# system/sampling/gpt_generator.py); check_fit and frozen_tokenizer stay importable here.
VapiPolicy = GPTGenerator


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


def vapi_loss(policy: Generator, batch: Rollouts, cfg: GRPOConfig, reference: Optional[Generator] = None
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO + prior loss of `policy` on a rollout batch (one teacher-forced forward per image)."""
    logits = policy(batch.inputs, batch.labels)  # (B, L, V); grpo_loss scales by 1 / cfg.temperature
    ref_logits = None
    if reference is not None and cfg.kl > 0:
        with torch.no_grad():
            ref_logits = reference(batch.inputs, batch.labels)
    loss, m = grpo_loss(logits, batch.image_index, batch.tokens, batch.logp, batch.rewards, batch.group_ids,
                        batch.gt_tokens, cfg, ref_logits)
    m["reward_mean"] = batch.rewards.mean()
    m["reward_std"] = batch.rewards.std() if batch.rewards.numel() > 1 else batch.rewards.new_zeros(())
    m["mse"], m["lpips"] = batch.mse.mean(), batch.lpips.mean()
    return loss, m


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
    lp = LPIPS(lpips_vgg, lpips_lin) if use_lpips else None
    return policy, tok, lp


def rollout_config(m: VapiConfig) -> RolloutConfig:
    """The rollout and GRPO settings of the method's config (one temperature for both sides)."""
    return RolloutConfig(group_size=m.group_size, noise_p=m.noise_p, temperature=m.temperature, w_mse=m.w_mse,
                         w_lpips=m.w_lpips, grpo=GRPOConfig(clip_eps=m.clip_eps, adv_clip=m.adv_clip, adv_eps=m.adv_eps,
                                                            beta=m.beta, kl=m.kl, temperature=m.temperature))


def check_config(m: VapiConfig, data: DataSpec) -> None:
    """Method-level rules, before any actor starts (the export's model.json is read, nothing built)."""
    if bool(m.export_url) == bool(m.llamagen_gpt or m.llamagen_vq):
        raise ValueError("set either method.export_url or method.llamagen_gpt + method.llamagen_vq (and export_url=null)")
    if m.w_lpips > 0 and not (m.lpips_net.vgg_path or m.lpips_net.random_init):
        raise ValueError("method.w_lpips > 0 needs method.lpips_net.vgg_path/lin_path (or random_init=true for a demo)")
    if m.group_size < 2:
        raise ValueError(f"method.group_size={m.group_size}: advantages are normalised within a group; use group_size >= 2")
    if m.temperature <= 0:
        raise ValueError(f"method.temperature={m.temperature} must be > 0")
    if m.export_url:
        from system.models.artifacts import model_part

        try:
            size = model_part(m.export_url, "tokenizer", data.storage)["config"].get("image_size")
        except FileNotFoundError as e:
            raise ValueError(f"method.export_url: {e} (train one with jobs/eostok_h.py first; the embedded demo's is made by `make demo`)") from None
        if size is not None and size != data.resolution:
            raise ValueError(f"data.resolution={data.resolution} but the tokenizer of {m.export_url} works at "
                             f"{size} px; set data.resolution={size}")


class VapiMethod(Method):
    """VAπ's GRPO learner as a method: one module "policy" (the AR generator, trained), one phase
    "policy" on a batch of rollouts {"rollouts": Rollouts, "stats": whole-batch statistics} from
    the rollout pool's batch source (cluster/rollout_pool.py). The frozen tokenizer is exported
    beside the post-trained policy, so sampling and evaluation run on the result."""

    def __init__(self, cfg: VapiConfig, data: DataSpec):
        check_config(cfg, data)
        super().__init__(cfg, data)
        self.rcfg = rollout_config(cfg)
        self.tokenizer: Optional[Tokenizer] = None
        self.reference = self._load()[0].eval().requires_grad_(False) if cfg.kl > 0 else None

    @classmethod
    def resolve_data(cls, exp) -> DataSpec:
        return DataSpec(resolution=exp.data.resolution, num_classes=0, storage=exp.data.storage)  # the policy knows its classes

    @classmethod
    def check(cls, cfg: VapiConfig, data: DataSpec) -> None:
        check_config(cfg, data)

    def _load(self) -> tuple[Generator, Tokenizer]:
        m = self.cfg
        policy, tok, _ = load_parts(m.export_url, m.llamagen_gpt, m.llamagen_vq, use_lpips=False, storage=self.data.storage,
                                    llamagen_preset=m.llamagen_preset, **m.gpt_overrides)
        check_fit(policy, tok, self.data.resolution)
        self.tokenizer = tok
        return policy, tok

    def frozen_parts(self) -> list[nn.Module]:
        return [self.reference] if self.reference is not None else []

    def modules(self) -> dict[str, ModuleSpec]:
        return {"policy": ModuleSpec(self._load()[0])}

    def phases(self) -> list[str]:
        return ["policy"]

    def step(self, phase: str, mods: dict, batch: dict, step: int, carry: dict) -> StepOutput:
        policy = mods["policy"]
        # train: dropout + class dropout as the official update (ratios != 1, the clip acts on-policy);
        # eval: a deterministic update (on-policy ratios are exactly 1)
        policy.train(self.cfg.update_mode == "train")
        loss, m = vapi_loss(policy, batch["rollouts"], self.rcfg.grpo, self.reference)
        for k in ("reward_mean", "reward_std", "mse", "lpips", "adv_mean", "adv_std", "adv_abs_max"):
            m.pop(k, None)  # this rank's share: the whole batch's values come in `stats`
        device = loss.device
        m.update({k: torch.tensor(float(v), device=device) for k, v in batch["stats"].items()})
        return StepOutput(loss, m)

    def curve_keys(self) -> list[str]:
        return ["loss", "reward_mean", "ce_prior", "clip_frac", "ratio_mean", "weight_sync_s"]

    def sample_batch(self, batch, n):
        return None  # no image grid: the held-out reward is measured by the rollout pool

    def artifacts(self, mods: dict) -> dict[str, Artifact]:
        if self.tokenizer is None:
            self._load()
        return {"tokenizer": self.tokenizer.artifact(), "ar": mods["policy"].artifact()}


register("vapi", VapiConfig, VapiMethod)


def exported_policy_state(export_url: str, storage=None) -> dict[str, Tensor]:
    """The post-trained policy of a VAπ export as a `GPTGenerator` state dict ("ar.*" keys)."""
    from system.models.artifacts import load_part

    return {f"ar.{k}": v for k, v in load_part(export_url, "ar", storage, ema=False).items()}
