"""AR image generators trained on token shards (jobs/pretokenize.py -> jobs/train_ar.py).

- `ar` (ARMethod): next-token prediction with teacher forcing (LlamaGen, AliTok's AR, EOSTok's AR
  trained two-stage): logits[:, i] predicts codes[:, i] from the class token and codes[:, :i].
- `masked_ar` (MaskedARMethod): SemTok's masked AR: each sequence gets a mask ratio ~ U[mask_min,
  mask_max] and a random order; the first ceil(ratio * L) positions of that order are replaced by
  the mask embedding and a bidirectional GPT predicts them (a bitwise head for the semtok-ar-*
  presets: one binary classifier per index bit), label smoothing 0.01.

One module "ar" (the GPT, with an EMA when `ema_decay` > 0; its embedding tables kept out of weight
decay with `decay_embeddings=false`, as AliTok's code), one phase "ar". The GPT comes from a registry preset plus
single-field overrides; the vocabulary, sequence length and class count come from the token index
(`DataSpec.tokens`), so one recipe fits any tokenizer. With `tokenizer_export`, samples are decoded
through that tokenizer for the run's PNG grid and the tokenizer is exported beside the AR model, so
`jobs/sample.py export_url=<run>/export` samples and decodes it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from system.config import ARConfig, ConfigError, MaskedARConfig, override_dataclass
from system.data.sources import TokenShards
from system.losses.recon import ntp_loss
from system.methods.base import DataSpec, Method, ModuleSpec, StepOutput
from system.methods.registry import register
from system.models.artifacts import Artifact, check_prefix
from system.models.flops import device_peak_flops, gpt_flops_per_token
from system.models.gpt import GPT, GPTConfig, bits_to_index, index_to_bits
from system.models.registry import gpt_config

DERIVED = ("vocab_size", "block_size", "num_classes", "n_bits", "bidirectional", "code_dim")  # set from the data / method


def build_gpt_config(cfg: ARConfig, data: DataSpec, masked: bool) -> GPTConfig:
    """The preset `method.model` with `method.overrides`, sized by the token index; ConfigError
    naming the key for anything that cannot work."""
    if not data.tokens:
        raise ConfigError("AR training needs token shards: data.url must be a token shard set (jobs/pretokenize.py)")
    seq_len, vocab = data.tokens.seq_len, data.tokens.vocab_size
    try:
        base = gpt_config(cfg.model)
    except KeyError as e:
        raise ConfigError(f"config key 'method.model' = {cfg.model!r}: {e.args[0]}") from None
    fixed = sorted(set(cfg.overrides) & set(DERIVED))
    if fixed:
        raise ConfigError(f"config key 'method.overrides' sets {fixed}: these come from the token index (vocab_size, "
                          "block_size = seq_len - prefix_tokens, num_classes) and the objective (bidirectional, n_bits)")
    g = override_dataclass(base, cfg.overrides, "method.overrides")
    what = f"method.model={cfg.model}" + (f" with method.overrides={dict(cfg.overrides)}" if cfg.overrides else "")
    if not masked and (g.bidirectional or g.head == "bitwise"):
        raise ConfigError(f"{what} is a masked model (bidirectional / bitwise head): train it with objective=masked_ar, "
                          "or pick a next-token preset (llamagen-*, alitok-*, eostok-*)")
    if seq_len <= g.prefix_tokens:
        raise ConfigError(f"{what} has {g.prefix_tokens} prefix tokens but the token index (data.url) has sequences of "
                          f"{seq_len}: set method.overrides.prefix_tokens")
    n_bits = 0
    if g.head == "bitwise":
        n_bits = vocab.bit_length() - 1
        if vocab != 1 << n_bits:
            raise ConfigError(f"{what} has a bitwise head, which needs a power-of-two vocabulary; the token index "
                              f"(data.url) has {vocab} codes: use method.overrides.head=softmax")
    try:
        return dataclasses.replace(
            g, vocab_size=vocab, block_size=seq_len - g.prefix_tokens, num_classes=data.num_classes, n_bits=n_bits,
            bidirectional=masked, code_dim=None, class_dropout=cfg.class_dropout, attn_backend=cfg.attn_backend,
            grad_checkpointing=cfg.grad_checkpointing)
    except ValueError as e:  # GPTConfig's own rules, e.g. 2D RoPE over a non-square token grid
        layout = tokenizer_layout(data)
        if layout is not None and layout[0] != g.prefix_tokens and layout[0] + layout[1] == seq_len:
            raise ConfigError(
                f"config key 'method.model' = {cfg.model!r} (method.overrides.prefix_tokens = {g.prefix_tokens}) does not "
                f"match its codes: the tokenizer that wrote data.url ({data.tokens.tokenizer.get('url')}) has "
                f"num_prefix_tokens = {layout[0]} + {layout[1]} latent tokens = {seq_len} per image, leaving "
                f"{seq_len - g.prefix_tokens} for the AR's grid ({e}). Make them agree: method.overrides.prefix_tokens="
                f"{layout[0]}, or train the tokenizer with num_prefix_tokens={g.prefix_tokens} "
                "(its method.tokenizer / tokenizer_overrides)") from None
        grid = seq_len - g.prefix_tokens
        if g.rope in ("2d", "mixed") and math.isqrt(grid) ** 2 != grid:  # no tokenizer to ask: the count that fits
            square = seq_len - math.isqrt(seq_len) ** 2
            raise ConfigError(f"{what} has {g.prefix_tokens} prefix tokens, so the token index's sequences of {seq_len} "
                              f"(data.url) leave a grid of {grid} image tokens, not a square (rope={g.rope!r}): the "
                              f"tokenizer's prefix count must be the AR model's; with method.overrides.prefix_tokens="
                              f"{square} the grid is {seq_len - square} (AliTok: the paper's 16, the released code's 17)"
                              ) from None
        raise ConfigError(f"{what} on token sequences of {seq_len} (data.url): {e}") from None


def tokenizer_layout(data: DataSpec) -> Optional[tuple[int, int]]:
    """(prefix tokens, latent tokens) of the tokenizer that wrote the token set, from its export's
    model.json (None when it has no such layout or cannot be read)."""
    tok = (data.tokens.tokenizer if data.tokens else None) or {}
    if not tok.get("url"):
        return None
    from system.models.artifacts import model_part

    try:
        c = model_part(tok["url"], tok.get("part", "tokenizer"), data.storage)["config"]
    except (FileNotFoundError, KeyError, ValueError, OSError):
        return None
    if "num_prefix_tokens" not in c or "num_latent_tokens" not in c:
        return None
    return int(c["num_prefix_tokens"]), int(c["num_latent_tokens"])


def check_tokenizer(cfg: ARConfig, gpt: GPTConfig, storage: Any) -> None:
    """`method.tokenizer_export` must hold a tokenizer that decodes the token set's codes."""
    if not cfg.tokenizer_export:
        return
    from system.models.tokenizers import load_tokenizer

    key = f"config key 'method.tokenizer_export' = {cfg.tokenizer_export!r}"
    try:
        tok = load_tokenizer(cfg.tokenizer_export, storage)
    except (FileNotFoundError, KeyError, ValueError, OSError) as e:
        raise ConfigError(f"{key}: {e}") from None
    if tok.vocab_size != gpt.vocab_size:
        raise ConfigError(f"{key}: its tokenizer has {tok.vocab_size} codes, the token index {gpt.vocab_size}")
    try:
        tok.image_size_for(gpt.seq_len)
    except ValueError as e:
        raise ConfigError(f"{key}: {e} (the token index has sequences of {gpt.seq_len})") from None
    try:
        check_prefix(gpt.prefix_tokens, tok.prefix_tokens, f"method.model={cfg.model} (method.overrides.prefix_tokens)")
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


class ARMethod(Method):
    """Next-token AR training on token shards (module docstring)."""

    masked = False
    report_keys = ("step", "loss", "acc", "tokens_per_s", "mfu")

    def __init__(self, cfg: ARConfig, data: DataSpec):
        super().__init__(cfg, data)
        self.gpt_cfg = build_gpt_config(cfg, data, self.masked)
        self.flops_per_token = gpt_flops_per_token(self.gpt_cfg)
        self.device = torch.device("cpu")
        self._peak: Optional[float] = None
        self._tokenizer: Any = None

    @classmethod
    def check(cls, cfg: ARConfig, data: DataSpec) -> None:
        check_tokenizer(cfg, build_gpt_config(cfg, data, cls.masked), data.storage)

    def to(self, device: torch.device) -> "ARMethod":
        self.device = torch.device(device)
        self._peak = device_peak_flops(self.device)
        return self

    # ------------------------------------------------------------------ modules
    def modules(self) -> dict[str, ModuleSpec]:
        gpt = GPT(self.gpt_cfg)
        no_decay = () if self.cfg.decay_embeddings else gpt.embedding_names()
        return {"ar": ModuleSpec(gpt, ema_decay=self.cfg.ema_decay, no_decay=no_decay)}

    def phases(self) -> list[str]:
        return ["ar"]

    def curve_keys(self) -> list[str]:
        return ["loss", "acc", "tokens_per_s"]

    # -------------------------------------------------------------------- steps
    def token_mask(self, codes: Tensor) -> Optional[Tensor]:
        """Positions the model predicts from a mask embedding (None: next-token prediction)."""
        return None

    def step(self, phase: str, mods: dict[str, nn.Module], batch: dict, step: int, carry: dict) -> StepOutput:
        codes, labels = batch["codes"], batch["label"]
        mask = self.token_mask(codes)
        logits = mods["ar"](codes, labels, token_mask=mask)  # (B, L, V) | (B, L, n_bits, 2)
        loss, metrics = self.objective(logits, codes, mask)
        if mask is not None:
            metrics["mask_ratio"] = mask.float().mean()
        return StepOutput(loss, metrics)

    def objective(self, logits: Tensor, codes: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """(cross-entropy over the predicted positions, metrics): token accuracy `acc` (and per-bit
        `bit_acc` for a bitwise head) over the same positions."""
        ls = self.cfg.label_smoothing
        if self.gpt_cfg.head == "bitwise":
            bits = index_to_bits(codes, self.gpt_cfg.n_bits)  # (B, L, n_bits)
            loss, bit_acc = ntp_loss(logits, bits, ls, mask=None if mask is None else mask.unsqueeze(-1).expand_as(bits))
            pred = bits_to_index(logits.detach().argmax(-1))
            extra = {"bit_acc": bit_acc}
        else:
            loss, _ = ntp_loss(logits, codes, ls, mask=mask)
            pred, extra = logits.detach().argmax(-1), {}
        with torch.no_grad():
            hit = (pred == codes).float()
            acc = hit.mean() if mask is None else (hit * mask).sum() / mask.sum().clamp_min(1)
        return loss, {"acc": acc, **extra}

    def rate_metrics(self, samples_per_s: float) -> dict[str, float]:
        tokens = samples_per_s * self.gpt_cfg.seq_len
        out = {"tokens_per_s": tokens}
        if self._peak:  # model FLOPs utilisation per device (GPU of a known kind)
            out["mfu"] = tokens * self.flops_per_token / (self.collective.world_size * self._peak)
        return out

    # --------------------------------------------------------------- outputs
    def tokenizer(self) -> Any:
        """The frozen tokenizer of `method.tokenizer_export` (loaded once), or None."""
        if self._tokenizer is None and self.cfg.tokenizer_export:
            from system.models.tokenizers import load_tokenizer

            self._tokenizer = load_tokenizer(self.cfg.tokenizer_export, self.data.storage, device=self.device)
        return self._tokenizer

    def sample_batch(self, batch: Any, n: int) -> Any:
        return super().sample_batch(batch, n) if self.cfg.tokenizer_export else None

    def generate(self, model: GPT, labels: Tensor, seed: int) -> Tensor:
        from system.sampling.ar import generate

        c = self.cfg
        return generate(model, labels, cfg_scale=c.sample_cfg_scale, temperature=c.sample_temperature, top_k=c.sample_top_k,
                        top_p=c.sample_top_p, seed=seed)

    @torch.no_grad()
    def sample_images(self, mods: dict[str, nn.Module], batch: dict, seed: int) -> dict[str, Tensor]:
        tok = self.tokenizer()
        if tok is None:
            return {}
        codes = self.generate(mods["ar"], batch["label"], seed)
        return {"data (decoded codes)": tok.decode(batch["codes"]).float().clamp(-1, 1),
                "ar_sample": tok.decode(codes).float().clamp(-1, 1)}

    def artifacts(self, mods: dict[str, nn.Module]) -> dict[str, Artifact]:
        out = {"ar": Artifact("gpt", dataclasses.asdict(self.gpt_cfg), mods["ar"].state_dict())}
        tok = self.tokenizer()
        if tok is not None:  # a self-contained export: jobs/sample.py loads (tokenizer, ar) from one folder
            out = {"tokenizer": tok.artifact(), **out}
        return out


class MaskedARMethod(ARMethod):
    """SemTok-style masked AR on token shards (module docstring)."""

    masked = True
    report_keys = ("step", "loss", "acc", "bit_acc", "tokens_per_s", "mfu")

    @classmethod
    def check(cls, cfg: MaskedARConfig, data: DataSpec) -> None:
        if cfg.mask_min > cfg.mask_max:
            raise ConfigError(f"config key 'method.mask_min' = {cfg.mask_min} is above method.mask_max = {cfg.mask_max}")
        super().check(cfg, data)

    def token_mask(self, codes: Tensor) -> Tensor:
        """(B, L) bool: per sample a ratio r ~ U[mask_min, mask_max] and a random order; the first
        ceil(r L) positions of the order are masked (at least one)."""
        b, n = codes.shape
        lo, hi = self.cfg.mask_min, self.cfg.mask_max
        ratio = lo + (hi - lo) * torch.rand(b, device=codes.device)
        count = torch.ceil(ratio * n).clamp(1, n)
        rank = torch.rand(b, n, device=codes.device).argsort(-1).argsort(-1)  # position -> place in the order
        return rank < count[:, None]

    def generate(self, model: GPT, labels: Tensor, seed: int) -> Tensor:
        from system.sampling.masked import generate_masked

        c = self.cfg
        return generate_masked(model, labels, steps=min(c.sample_steps, self.gpt_cfg.seq_len), cfg_scale=c.sample_cfg_scale,
                               temperature=c.sample_temperature, top_k=c.sample_top_k, top_p=c.sample_top_p, seed=seed)


register("ar", ARConfig, ARMethod, source=TokenShards())
register("masked_ar", MaskedARConfig, MaskedARMethod, source=TokenShards())
