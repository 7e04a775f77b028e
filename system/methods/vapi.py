"""VAπ: pixel-space post-training of an AR image generator (../shared/seeds/vapi.txt).

Rollout: one teacher-forced forward of the policy over an image's (optionally noised) ground-truth
token prefix; G sequences per image sampled position-wise from those logits; each decoded by the
frozen tokenizer and scored with reward = -(w_mse MSE + w_lpips LPIPS) against the real image.
The GRPO update (system/methods/grpo.py) raises the log-probability of the better samples, with a
cross-entropy prior on the ground-truth tokens. Works with our 1D tokenizer + GPT (EOSTok/AliTok
exports) and LlamaGen's VQ-16 + c2i GPT through `FrozenTokenizer`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from system.losses.lpips import LPIPS
from system.methods.grpo import GRPOConfig, grpo_loss
from system.models.gpt import GPT
from system.models.tokenizer1d import Tokenizer1D
from system.models.vqgan import VQModel


# ---------------------------------------------------------------------------- frozen tokenizers
class FrozenTokenizer(nn.Module):
    """Frozen tokenizer interface: encode images (B, 3, H, W) in [-1, 1] -> codes (B, L);
    decode codes (B, L) -> images; `codebook` (V, D) when the AR model embeds codes through it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenTokenizer":
        return super().train(False)

    @property
    def codebook(self) -> Optional[Tensor]:
        return None

    def encode(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, codes: Tensor) -> Tensor:
        raise NotImplementedError

    def num_tokens(self, resolution: int) -> int:
        """Codes per image at `resolution` px (ValueError when the tokenizer cannot take that size)."""
        raise NotImplementedError


class Tokenizer1DFrozen(FrozenTokenizer):
    """Our 1D tokenizer (EOSTok, AliTok exports); its codebook feeds the AR input embedding."""

    model: Tokenizer1D

    @property
    def codebook(self) -> Tensor:
        return self.model.codebook

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        quant, _ = self.model.encode(images)
        return quant.codes  # (B, L)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        return self.model.decode_codes(codes)  # (B, 3, H, W)

    def num_tokens(self, resolution: int) -> int:
        if resolution != self.model.cfg.image_size:
            raise ValueError(f"this 1D tokenizer works at {self.model.cfg.image_size} px, not {resolution}; "
                             f"set data.resolution={self.model.cfg.image_size}")
        return self.model.cfg.seq_len


class VQFrozen(FrozenTokenizer):
    """LlamaGen's VQ-16 (2D grid of codes, raster order); the GPT embeds ids with its own table."""

    model: VQModel

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        return self.model.encode(images).flatten(1)  # (B, h*w)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        return self.model.decode_codes(codes)

    def num_tokens(self, resolution: int) -> int:
        f = self.model.cfg.downsample
        if resolution % f:
            raise ValueError(f"data.resolution={resolution} is not a multiple of the VQ's downsampling factor {f}")
        return (resolution // f) ** 2


def frozen_tokenizer(model: nn.Module) -> FrozenTokenizer:
    if isinstance(model, FrozenTokenizer):
        return model
    if isinstance(model, Tokenizer1D):
        return Tokenizer1DFrozen(model)
    if isinstance(model, VQModel):
        return VQFrozen(model)
    raise TypeError(f"no FrozenTokenizer adapter for {type(model).__name__}; expected Tokenizer1D or VQModel")


# ---------------------------------------------------------------------------- policy
class VapiPolicy(nn.Module):
    """The trainable AR model plus the frozen codebook it embeds codes through (EOSTok's AR takes
    `codebook=`; LlamaGen's GPT does not). state_dict() holds the AR weights only ("ar.*")."""

    def __init__(self, ar: GPT, codebook: Optional[Tensor] = None):
        super().__init__()
        self.ar = ar
        needs = ar.code_proj is not None
        if needs and codebook is None:
            raise ValueError("this GPT embeds codes through a codebook (GPTConfig.code_dim set): pass the tokenizer's codebook")
        self.register_buffer("codebook", codebook.detach().clone() if needs else None, persistent=False)

    @property
    def vocab_size(self) -> int:
        return self.ar.cfg.vocab_size

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Teacher forcing: input ids (B, L), labels (B,) -> logits (B, L, V) for every position."""
        return self.ar(tokens, labels, codebook=self.codebook)


def check_fit(policy: VapiPolicy, tokenizer: FrozenTokenizer, resolution: int) -> None:
    """ValueError unless the AR model generates exactly the tokenizer's code sequence at `resolution`."""
    n, c = tokenizer.num_tokens(resolution), policy.ar.cfg
    if n != c.block_size:
        raise ValueError(f"the tokenizer gives {n} codes per {resolution} px image but the AR model generates "
                         f"{c.block_size} (e.g. LlamaGen's 384 px checkpoints need method.gpt_overrides.block_size=576 "
                         "and data.resolution=384)")
    if getattr(tokenizer, "codebook", None) is not None and tokenizer.codebook.shape[0] != c.vocab_size:
        raise ValueError(f"codebook size {tokenizer.codebook.shape[0]} != AR vocab {c.vocab_size}")


# ---------------------------------------------------------------------------- rollouts
@dataclass
class VapiConfig:
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
def rollout(policy: VapiPolicy, tokenizer: FrozenTokenizer, lpips: Optional[LPIPS], images: Tensor, labels: Tensor,
            group_ids: Tensor, cfg: VapiConfig, generator: torch.Generator,
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


def vapi_loss(policy: nn.Module, batch: Rollouts, cfg: GRPOConfig, reference: Optional[nn.Module] = None
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO + prior loss of `policy` on a rollout batch (one teacher-forced forward per image)."""
    logits = policy(batch.inputs, batch.labels)  # (B, L, V)
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
def heldout_reward(policy: VapiPolicy, tokenizer: FrozenTokenizer, lpips: Optional[LPIPS], images: Tensor,
                   labels: Tensor, cfg: VapiConfig, seed: int = 0) -> float:
    """Mean reward of teacher-forced rollouts on held-out images (fixed seed): the eval signal."""
    gen = torch.Generator(device=images.device).manual_seed(seed)
    ids = torch.arange(images.shape[0], device=images.device)
    return float(rollout(policy, tokenizer, lpips, images, labels, ids, cfg, gen).rewards.mean())


def load_parts(export_url: Optional[str] = None, llamagen_gpt: Optional[str] = None, llamagen_vq: Optional[str] = None,
               lpips_vgg: Optional[str] = None, lpips_lin: Optional[str] = None, use_lpips: bool = True,
               storage=None, llamagen_preset: Optional[str] = None, **gpt_overrides) -> tuple[VapiPolicy, FrozenTokenizer, Optional[LPIPS]]:
    """(policy, frozen tokenizer, LPIPS) from an export of ours or LlamaGen checkpoint paths (CPU)."""
    if export_url and not (llamagen_gpt or llamagen_vq):
        from system.models.export_io import load_tokenizer_ar

        tok_model, ar = load_tokenizer_ar(export_url, storage)
        tok = frozen_tokenizer(tok_model)
        policy = VapiPolicy(ar.eval(), tok.codebook)
    elif llamagen_gpt and llamagen_vq and not export_url:
        from system.models.adapters_llamagen_gpt import load_llamagen_gpt
        from system.models.adapters_vq import load_llamagen_vq

        tok = frozen_tokenizer(load_llamagen_vq(llamagen_vq))
        policy = VapiPolicy(load_llamagen_gpt(llamagen_gpt, name=llamagen_preset, **gpt_overrides).eval())
    else:
        raise ValueError("give either method.export_url (a run's export/ folder) or both method.llamagen_gpt and "
                         f"method.llamagen_vq (checkpoint paths); got export_url={export_url!r}, "
                         f"llamagen_gpt={llamagen_gpt!r}, llamagen_vq={llamagen_vq!r}")
    lp = LPIPS(lpips_vgg, lpips_lin) if use_lpips else None
    return policy, tok, lp
