"""Quantizers for 1D/2D tokenizers: VQ, IBQ (index backpropagation), BSQ (binary spherical).

All take latents z (B, L, D) and return a ``QuantizerOutput``. Loss terms in
``losses`` are already multiplied by their config weights; ``out.loss`` sums
them. Codebook utilisation and perplexity are computed from codes
(``codebook_usage``, ``codebook_perplexity``); in distributed training gather
the codes first (this module never communicates across ranks).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

QUANTIZER_TYPES = ("vq", "ibq", "bsq")
MAX_BSQ_BITS = 62  # codes must fit a signed int64
MAX_ENUMERABLE_BSQ_BITS = 16  # largest BSQ whose full codebook we materialise


@dataclass
class QuantizerConfig:
    """One flat config for every quantizer type (OmegaConf has no dataclass unions).

    type: "vq" | "ibq" | "bsq". For bsq, ``dim`` is the number of bits d and
    the implicit codebook has 2**d entries (``codebook_size`` is ignored).
    Loss weights: commit ||z - sg(e)||^2, codebook ||sg(z) - e||^2, double
    (IBQ only) ||e_st - z||^2 with e_st the straight-through one-hot lookup,
    entropy (IBQ/BSQ) sample_w * E[H(p)] - batch_w * H(E[p]).
    """

    type: str = "vq"
    codebook_size: int = 4096
    dim: int = 32
    l2_norm: bool = False
    commit_weight: float = 0.25
    codebook_weight: float = 1.0
    double_weight: float = 1.0
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01  # IBQ: softmax(logits / T) for the entropy term
    sample_entropy_weight: float = 1.0
    batch_entropy_weight: float = 1.0
    bsq_inv_temperature: float = 100.0  # BSQ: per-bit p(+) = sigmoid(4 * tau * u_i / sqrt(d))
    # BSQ: bits per group of the entropy term's codebook part. 1: the per-bit factorisation sum_i H(E[p_i])
    # (blind to bits that flip together); g > 1: the exact entropy of each group's 2^g sub-codes
    # (BSQ's grouping; bits assumed independent only across groups)
    entropy_group: int = 1
    reinit_after_steps: int = 0  # VQ: re-initialise codes unused for this many steps (0 = off)
    # VQ: AliTok's official "clustering" re-initialisation (0 = off; official 0.99): an EMA of each
    # code's usage with this decay, and every step code k moves to its nearest feature by a factor
    # exp(-usage_k * K * 10 / (1 - decay) - 1e-3) (about 1 for unused codes, about 0 at uniform use)
    cluster_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.type not in QUANTIZER_TYPES:
            raise ValueError(f"quantizer type {self.type!r} unknown; expected one of {QUANTIZER_TYPES}")
        if self.dim < 1:
            raise ValueError(f"quantizer dim must be >= 1, got {self.dim}")
        if self.type == "bsq" and self.dim > MAX_BSQ_BITS:
            raise ValueError(f"BSQ dim (bits) {self.dim} > {MAX_BSQ_BITS}: codes would not fit int64")
        if self.type != "bsq" and self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.reinit_after_steps < 0:
            raise ValueError(f"reinit_after_steps must be >= 0 (0 = off), got {self.reinit_after_steps}")
        if not 0.0 <= self.cluster_decay < 1.0:
            raise ValueError(f"cluster_decay must be in [0, 1) (0 = off), got {self.cluster_decay}")
        if not 1 <= self.entropy_group <= 16:
            raise ValueError(f"entropy_group must be in [1, 16] (2^g sub-codes per group), got {self.entropy_group}")
        if self.reinit_after_steps > 0 and self.cluster_decay > 0:
            raise ValueError("choose one codebook re-initialisation: reinit_after_steps (dead codes) or cluster_decay "
                             "(AliTok's clustering); set the other to 0")

    @property
    def reinit(self) -> bool:
        """A VQ that re-initialises codes during training (keeps usage buffers and code offsets)."""
        return self.type == "vq" and (self.reinit_after_steps > 0 or self.cluster_decay > 0)

    def without_reinit(self) -> "QuantizerConfig":
        """This config for inference: no re-initialisation (no training buffers)."""
        return dataclasses.replace(self, reinit_after_steps=0, cluster_decay=0.0)

    @property
    def num_codes(self) -> int:
        return 2**self.dim if self.type == "bsq" else self.codebook_size


class QuantizerOutput(NamedTuple):
    """codes (B, L) int64; quantized (B, L, D) with straight-through grads; probs (B, L, K) or None;
    onehot (B, L, K) straight-through one-hot (IBQ) or None; latents: the (normalised) quantizer input.
    A NamedTuple (not a dataclass) so DeepSpeed ZeRO-3 finds the tensors in module outputs and
    re-gathers parameters for their backward."""

    codes: Tensor
    quantized: Tensor
    probs: Optional[Tensor] = None
    onehot: Optional[Tensor] = None
    latents: Optional[Tensor] = None
    losses: Optional[dict[str, Tensor]] = None

    @property
    def loss(self) -> Tensor:
        """Sum of the (already weighted) regulariser terms; 0 when there are none."""
        if not self.losses:  # None or {}
            return self.quantized.new_zeros(())
        return torch.stack([v.float() for v in self.losses.values()]).sum()


def _fp32(z: Tensor) -> torch.autocast:
    """Context that turns autocast off so code assignment runs in float32."""
    return torch.autocast(device_type=z.device.type, enabled=False)


def _check_latents(z: Tensor, dim: int, who: str) -> None:
    if z.dim() != 3 or z.shape[-1] != dim:
        raise ValueError(f"{who} expects latents shaped (B, L, {dim}); got {tuple(z.shape)}")


def entropy_regulariser(probs: Tensor, sample_weight: float, batch_weight: float, eps: float = 1e-5) -> Tensor:
    """sample_weight * mean_n H(p_n) - batch_weight * H(mean_n p_n) over probs (..., K)."""
    p = probs.reshape(-1, probs.shape[-1]).float()
    sample = -(p * torch.log(p + eps)).sum(-1).mean()
    avg = p.mean(0)
    batch = -(avg * torch.log(avg + eps)).sum()
    return sample_weight * sample - batch_weight * batch


class _CodebookQuantizer(nn.Module):
    """Shared parts of VQ and IBQ: an nn.Embedding codebook (key ``embedding.weight``),
    N(0, 1) initialised (as IBQ), L2-normalised rows when ``l2_norm``."""

    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.dim)
        if cfg.l2_norm:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))

    @property
    def codebook(self) -> Tensor:
        """(K, D) code vectors as used for lookup (L2-normalised when ``l2_norm``)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.cfg.l2_norm else w

    def embed_codes(self, codes: Tensor) -> Tensor:
        """codes (...) int -> (..., D) code vectors."""
        return F.embedding(codes, self.codebook)


class VectorQuantizer(_CodebookQuantizer):
    """Nearest-neighbour VQ (plain or L2-normalised/cosine) with commitment + codebook losses.

    Optional codebook re-initialisation during training, once per step with the same inputs on
    every rank: dead codes (``reinit_dead_codes(codes, features)``, ``reinit_after_steps``) or
    AliTok's clustering rule (``nearest_features`` on each rank, then ``cluster_update`` with the
    global usage and every rank's nearest features, ``cluster_decay``). Re-initialisation never
    writes the trained weight: it moves a buffer ``code_offset`` and the codebook is
    ``embedding.weight + code_offset``. An optimiser that keeps its own master copy of the weights
    (DeepSpeed ZeRO 1-3 does) would overwrite an in-place change of the weight at its next step;
    the offset survives it, and the weight keeps training by gradient from where it is (the same
    as an in-place change followed by gradient steps). ``inference_state`` folds the offset in.
    """

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg)
        with torch.no_grad():  # taming/LlamaGen init: U(-1/K, 1/K), then normalised when l2_norm
            w = self.embedding.weight.uniform_(-1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
            if cfg.l2_norm:
                w.copy_(F.normalize(w, dim=-1))
        if cfg.reinit_after_steps > 0:
            self.register_buffer("unused_steps", torch.zeros(cfg.codebook_size, dtype=torch.long))
        if cfg.cluster_decay > 0:
            self.register_buffer("usage_ema", torch.zeros(cfg.codebook_size))  # official name: embed_prob
        self.register_buffer("code_offset", torch.zeros(cfg.codebook_size, cfg.dim) if cfg.reinit else None)

    @property
    def raw_codebook(self) -> Tensor:
        """(K, D) code vectors before L2 normalisation: the weight plus the re-initialisation offset."""
        w = self.embedding.weight
        return w if self.code_offset is None else w + self.code_offset.to(w.dtype)

    @property
    def codebook(self) -> Tensor:
        w = self.raw_codebook
        return F.normalize(w, dim=-1) if self.cfg.l2_norm else w

    def inference_state(self, prefix: str = "") -> tuple[QuantizerConfig, dict[str, Tensor]]:
        """(config without re-initialisation, state dict with the offset folded into the weight):
        the same codebook as a plain VQ with no training buffers."""
        return self.cfg.without_reinit(), {f"{prefix}embedding.weight": self.raw_codebook.detach().clone()}

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, L, D) -> QuantizerOutput (probs None)."""
        _check_latents(z, self.cfg.dim, "VectorQuantizer")
        with _fp32(z):
            zf = z.float()
            if self.cfg.l2_norm:
                zf = F.normalize(zf, dim=-1)
            cb = self.codebook.float()
            d = zf.pow(2).sum(-1, keepdim=True) + cb.pow(2).sum(-1) - 2.0 * zf @ cb.t()  # (B, L, K)
            codes = d.argmin(-1)
            e = F.embedding(codes, cb)  # (B, L, D)
            losses = {
                "commit": self.cfg.commit_weight * F.mse_loss(zf, e.detach()),
                "codebook": self.cfg.codebook_weight * F.mse_loss(e, zf.detach()),
            }
            quantized = (zf + (e - zf).detach()).to(z.dtype)
        return QuantizerOutput(codes=codes, quantized=quantized, latents=zf.to(z.dtype), losses=losses)

    @torch.no_grad()
    def reinit_dead_codes(self, codes: Tensor, features: Tensor, generator: torch.Generator | None = None) -> int:
        """Count a step of usage from ``codes`` and re-initialise codes unused for
        ``reinit_after_steps`` steps with random rows of ``features`` (N, D) or (B, L, D),
        typically ``out.latents``. Uses torch's RNG (or ``generator``), so it is
        deterministic given the seed; in distributed training all-gather codes and
        features first so every rank makes the same change. Returns how many codes were replaced.
        """
        if self.cfg.reinit_after_steps <= 0:
            raise RuntimeError("reinit_dead_codes needs QuantizerConfig.reinit_after_steps > 0")
        feats = features.detach().reshape(-1, features.shape[-1]).float()
        if feats.shape[-1] != self.cfg.dim or feats.shape[0] == 0:
            raise ValueError(f"features must be (N, {self.cfg.dim}) with N > 0; got {tuple(features.shape)}")
        used = torch.bincount(codes.reshape(-1).to(self.unused_steps.device), minlength=self.cfg.codebook_size) > 0
        self.unused_steps += 1
        self.unused_steps[used] = 0
        dead = (self.unused_steps >= self.cfg.reinit_after_steps).nonzero().squeeze(-1)
        n = int(dead.numel())
        if n == 0:
            return 0
        dev = feats.device if generator is None else generator.device
        rows = torch.randint(0, feats.shape[0], (n,), generator=generator, device=dev).to(feats.device)
        new = feats[rows]
        if self.cfg.l2_norm:
            new = F.normalize(new, dim=-1)
        dead = dead.to(self.code_offset.device)
        self.code_offset[dead] += new.to(self.code_offset) - self.raw_codebook.detach()[dead].to(self.code_offset)
        self.unused_steps[dead] = 0
        return n

    @torch.no_grad()
    def nearest_features(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """For each code, the nearest of this rank's ``features`` (..., D) (the quantizer inputs, in
        the distance the forward uses): (squared distances (K,), features (K, D) as given, not
        normalised). ``cluster_update`` takes every rank's pair and keeps the global nearest."""
        z = features.detach().reshape(-1, self.cfg.dim).float()
        if z.shape[0] == 0:
            raise ValueError("nearest_features needs at least one feature")
        zn = F.normalize(z, dim=-1) if self.cfg.l2_norm else z
        cb = self.codebook.detach().float()
        d = zn.pow(2).sum(-1, keepdim=True) + cb.pow(2).sum(-1) - 2.0 * zn @ cb.t()  # (N, K)
        dist, idx = d.min(0)
        return dist, z[idx]

    @torch.no_grad()
    def cluster_update(self, counts: Tensor, dists: Tensor, feats: Tensor) -> Tensor:
        """AliTok's clustering re-initialisation (official ``vae_stage1.py``), one step: the usage EMA
        takes the step's code frequencies ``counts`` (K,) (global: summed over ranks); each code k
        moves to its nearest feature f_k by ``a_k = exp(-usage_k * K * 10 / (1 - decay) - 1e-3)``:
        ``code_k <- code_k (1 - a_k) + f_k a_k``. ``dists`` (R, K) and ``feats`` (R, K, D) are every
        rank's ``nearest_features`` in rank order; f_k is the first rank's at the smallest distance
        (the official argmin over the concatenated batch). Returns a (K,)."""
        if self.cfg.cluster_decay <= 0:
            raise RuntimeError("cluster_update needs QuantizerConfig.cluster_decay > 0")
        k, decay = self.cfg.codebook_size, self.cfg.cluster_decay
        if counts.shape != (k,) or dists.dim() != 2 or dists.shape[1] != k or feats.shape != (*dists.shape, self.cfg.dim):
            raise ValueError(f"cluster_update expects counts ({k},), dists (R, {k}), feats (R, {k}, {self.cfg.dim}); "
                             f"got {tuple(counts.shape)}, {tuple(dists.shape)}, {tuple(feats.shape)}")
        dev = self.usage_ema.device
        counts = counts.to(dev, torch.float32)
        self.usage_ema.mul_(decay).add_(counts / counts.sum().clamp_min(1), alpha=1 - decay)
        best = dists.to(dev).argmin(0)  # (K,) first rank at the minimum
        nearest = feats.to(dev, torch.float32)[best, torch.arange(k, device=dev)]  # (K, D)
        a = torch.exp(-(self.usage_ema * k * 10) / (1 - decay) - 1e-3)
        raw = self.raw_codebook.detach().float()
        self.code_offset += (a[:, None] * (nearest - raw)).to(self.code_offset)
        return a


class IBQuantizer(_CodebookQuantizer):
    """Index backpropagation quantization: logits = z @ C^T, p = softmax(logits),
    onehot_st = onehot(argmax) + p - sg(p), quantized = onehot_st @ C
    (gradients reach both the encoder and every code)."""

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, L, D) -> QuantizerOutput with probs and the straight-through one-hot (B, L, K)."""
        _check_latents(z, self.cfg.dim, "IBQuantizer")
        with _fp32(z):
            zf = z.float()
            if self.cfg.l2_norm:
                zf = F.normalize(zf, dim=-1)
            cb = self.codebook.float()
            logits = zf @ cb.t()  # (B, L, K)
            probs = logits.softmax(-1)
            codes = logits.argmax(-1)
            hard = F.one_hot(codes, self.cfg.codebook_size).to(probs.dtype)
            onehot = hard + probs - probs.detach()
            quantized = onehot @ cb  # (B, L, D), value == cb[codes]
            e = F.embedding(codes, cb)
            losses = {
                "double": self.cfg.double_weight * F.mse_loss(quantized, zf),
                "commit": self.cfg.commit_weight * F.mse_loss(zf, e.detach()),
                "codebook": self.cfg.codebook_weight * F.mse_loss(e, zf.detach()),
            }
            if self.cfg.entropy_weight > 0:
                p_t = (logits / self.cfg.entropy_temperature).softmax(-1)
                losses["entropy"] = self.cfg.entropy_weight * entropy_regulariser(
                    p_t, self.cfg.sample_entropy_weight, self.cfg.batch_entropy_weight
                )
        return QuantizerOutput(
            codes=codes, quantized=quantized.to(z.dtype), probs=probs, onehot=onehot, latents=zf.to(z.dtype), losses=losses
        )


def bits_to_codes(bits: Tensor) -> Tensor:
    """bits (..., d) in {0, 1} (bit i has weight 2**i) -> codes (...) int64."""
    d = bits.shape[-1]
    if d > MAX_BSQ_BITS:
        raise ValueError(f"{d} bits do not fit int64 codes (max {MAX_BSQ_BITS})")
    weights = 2 ** torch.arange(d, device=bits.device, dtype=torch.long)
    return (bits.long() * weights).sum(-1)


def codes_to_bits(codes: Tensor, d: int) -> Tensor:
    """codes (...) int -> bits (..., d) int64 in {0, 1}; inverse of ``bits_to_codes``."""
    if d > MAX_BSQ_BITS:
        raise ValueError(f"{d} bits do not fit int64 codes (max {MAX_BSQ_BITS})")
    shifts = torch.arange(d, device=codes.device, dtype=torch.long)
    return (codes.long().unsqueeze(-1) >> shifts) & 1


class BSQuantizer(nn.Module):
    """Binary spherical quantization: u = z / |z|, q = sign(u) / sqrt(d), straight-through;
    code = bits (bit i = [u_i > 0], weight 2**i). Entropy loss uses the factorised per-bit
    soft assignment p_i(+) = sigmoid(4 tau u_i / sqrt(d)) (softmax over codes of -tau |u - c|^2)."""

    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.cfg = cfg

    @property
    def codebook(self) -> Tensor:
        """(2**d, d) enumerated codebook; only for d <= 16 (use ``embed_codes`` otherwise)."""
        d = self.cfg.dim
        if d > MAX_ENUMERABLE_BSQ_BITS:
            raise ValueError(f"BSQ with {d} bits has 2**{d} codes; too many to enumerate, use embed_codes(codes)")
        return self.embed_codes(torch.arange(2**d))

    def embed_codes(self, codes: Tensor) -> Tensor:
        """codes (...) int -> (..., d) vectors with entries +-1/sqrt(d)."""
        bits = codes_to_bits(codes, self.cfg.dim).float()
        return (2.0 * bits - 1.0) / math.sqrt(self.cfg.dim)

    def forward(self, z: Tensor, batch_mean: Optional[Callable[[Tensor], Tensor]] = None) -> QuantizerOutput:
        """z (B, L, d) -> QuantizerOutput (probs None; K = 2**d is too large to materialise).
        `batch_mean` maps this batch's mean bit probabilities (d,) to the mean over the global batch
        (all ranks) for the entropy term's codebook part; None: this batch alone."""
        with _fp32(z):  # the entropy term's sub-code products and logs in fp32 under autocast
            return self._forward(z, batch_mean)

    def _forward(self, z: Tensor, batch_mean: Optional[Callable[[Tensor], Tensor]]) -> QuantizerOutput:
        d = self.cfg.dim
        _check_latents(z, d, "BSQuantizer")
        u = F.normalize(z.float(), dim=-1)
        bits = u > 0
        q = (2.0 * bits.float() - 1.0) / math.sqrt(d)
        losses = {"commit": self.cfg.commit_weight * F.mse_loss(u, q)}
        if self.cfg.entropy_weight > 0:
            p = torch.sigmoid(4.0 * self.cfg.bsq_inv_temperature * u / math.sqrt(d)).reshape(-1, d)
            losses["entropy"] = self.cfg.entropy_weight * _bitwise_entropy_loss(
                p, self.cfg.sample_entropy_weight, self.cfg.batch_entropy_weight, batch_mean, self.cfg.entropy_group
            )
        quantized = (u + (q - u).detach()).to(z.dtype)
        return QuantizerOutput(codes=bits_to_codes(bits), quantized=quantized, latents=u.to(z.dtype), losses=losses)


def _binary_entropy(p: Tensor, eps: float = 1e-6) -> Tensor:
    p = p.clamp(eps, 1 - eps)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def _group_code_probs(p: Tensor) -> Tensor:
    """Per-bit probabilities p (N, g) -> the probabilities (N, 2^g) of the group's 2^g sub-codes
    (bits independent within a sample; sub-code c has bit i = (c >> i) & 1)."""
    g = p.shape[-1]
    bits = ((torch.arange(2**g, device=p.device)[:, None] >> torch.arange(g, device=p.device)) & 1).to(p.dtype)  # (2^g, g)
    logp, log1p = p.clamp_min(1e-6).log(), (1 - p).clamp_min(1e-6).log()
    return torch.exp(logp @ bits.t() + log1p @ (1 - bits).t())


def _bitwise_entropy_loss(p: Tensor, sample_weight: float, batch_weight: float,
                          batch_mean: Optional[Callable[[Tensor], Tensor]] = None, group: int = 1) -> Tensor:
    """E[H(q(z))] - H(E[q(z)]) with per-bit probabilities p (N, d): per-sample entropy =
    sum_i H(p_i) (exact for independent bits); codebook entropy ~ the sum over groups of `group`
    bits of the entropy of the group's mean sub-code distribution (group 1: sum_i H(mean_n p_ni)),
    the means taken by `batch_mean` (over every rank) when given."""
    sample = _binary_entropy(p).sum(-1).mean()
    probs = p if group == 1 else batch_code_probs(p, group)  # (N, d) bits or (N, sum_k 2^g_k) sub-codes
    mean = probs.mean(0) if batch_mean is None else batch_mean(probs.mean(0))  # one reduction over ranks
    if group == 1:
        batch = _binary_entropy(mean).sum()
    else:  # the groups' distributions side by side: the sum of their entropies
        m = mean.clamp_min(1e-12)
        batch = -(m * m.log()).sum()
    return sample_weight * sample - batch_weight * batch


def batch_code_probs(p: Tensor, group: int) -> Tensor:
    """Per-bit probabilities p (N, d) -> each group of `group` bits' sub-code probabilities, side by
    side (N, sum_k 2^g_k) (the last group may be smaller)."""
    return torch.cat([_group_code_probs(c) for c in p.split(group, dim=-1)], dim=-1)


def build_quantizer(cfg: QuantizerConfig) -> nn.Module:
    """QuantizerConfig -> VectorQuantizer | IBQuantizer | BSQuantizer."""
    return {"vq": VectorQuantizer, "ibq": IBQuantizer, "bsq": BSQuantizer}[cfg.type](cfg)


def _code_counts(codes: Tensor, codebook_size: int) -> Tensor:
    flat = codes.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= codebook_size):
        raise ValueError(f"codes must lie in [0, {codebook_size}); got range [{int(flat.min())}, {int(flat.max())}]")
    return torch.unique(flat, return_counts=True)[1]  # works for 2**32-code BSQ too


def codebook_usage(codes: Tensor, codebook_size: int) -> float:
    """Fraction of the codebook that appears at least once in ``codes``."""
    return _code_counts(codes, codebook_size).numel() / codebook_size


def codebook_perplexity(codes: Tensor, codebook_size: int) -> float:
    """exp(entropy) of the empirical code distribution (1 = one code, K = uniform)."""
    counts = _code_counts(codes, codebook_size).double()
    if counts.numel() == 0:
        return 0.0
    p = counts / counts.sum()
    return float(torch.exp(-(p * p.log()).sum()))
