"""The generator adapter of our GPT (kind "gpt"): the trainable AR model plus, when it embeds codes
through it, the tokenizer's frozen codebook, behind the `Generator` protocol
(system/models/artifacts.py). It lives in system/sampling, not beside system/models/gpt.py,
because a generator samples (system.sampling.ar / system.sampling.masked); its kind is registered in
system/sampling/generators.py."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from system.models.artifacts import Artifact, Tokenizer, config_from_dict
from system.models.gpt import GPT, GPTConfig, bits_to_index
from system.sampling.ar import generate
from system.sampling.masked import generate_masked

MASKED_STEPS = 64  # sampling steps of a bidirectional (masked) GPT (SemTok: 64, cosine)


def build_gpt(config: dict, state_dict: Optional[dict[str, Tensor]]) -> GPT:
    """Our GPT with its weights (trainable, eval mode); `state_dict` None: the architecture only (plan mode)."""
    model = GPT(config_from_dict(GPTConfig, config, "gpt"))
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


class GPTGenerator(nn.Module):
    """Our GPT (kind "gpt"; LlamaGen's c2i GPT loads into it) plus the frozen codebook it embeds
    codes through when its config has `code_dim` (EOSTok). state_dict() holds the AR weights only
    ("ar.*"); the AR model stays trainable (VAπ trains it)."""

    kind = "gpt"

    def __init__(self, ar: GPT, codebook: Optional[Tensor] = None):
        super().__init__()
        self.ar = ar
        needs = ar.code_proj is not None
        if needs and codebook is None:
            raise ValueError(f"this GPT embeds codes through a codebook (GPTConfig.code_dim={ar.cfg.code_dim}): "
                             "pass the tokenizer's codebook (e.g. load_generator(..., tokenizer=...) or load_pair)")
        self.register_buffer("codebook", codebook.detach().clone() if needs else None, persistent=False)
        self._decode_fn: Optional[Callable] = None

    @classmethod
    def from_export(cls, config: dict, state_dict: Optional[dict[str, Tensor]], tokenizer: Optional[Tokenizer]) -> "GPTGenerator":
        """The generator of an exported "gpt" part; `tokenizer` gives the codebook when the GPT has `code_dim`."""
        return cls(build_gpt(config, state_dict),
                   tokenizer.codebook if tokenizer is not None and config.get("code_dim") else None)

    def artifact(self) -> Artifact:
        """The AR model as an exported part of kind "gpt"."""
        return Artifact.of(self.kind, self.ar)

    @property
    def vocab_size(self) -> int:
        return self.ar.cfg.vocab_size

    @property
    def num_classes(self) -> int:
        return self.ar.cfg.num_classes

    @property
    def block_size(self) -> int:
        return self.ar.cfg.block_size

    @property
    def seq_len(self) -> int:
        return self.ar.cfg.seq_len

    @property
    def prefix_tokens(self) -> int:
        return self.ar.cfg.prefix_tokens

    @property
    def masked(self) -> bool:
        """A bidirectional GPT (SemTok's masked AR) is a masked generator."""
        return bool(self.ar.cfg.bidirectional)

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Teacher forcing: input ids (B, L), labels (B,) -> logits (B, L, V) for every position."""
        return self.ar(tokens, labels, codebook=self.codebook)

    @torch.no_grad()
    def predict_masked(self, tokens: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
        """ids (B, L) with `mask` (B, L) bool positions replaced by the mask embedding, labels (B,) ->
        the argmax ids (B, L) (a bitwise head: each bit's argmax, as an index)."""
        if not self.masked:
            raise ValueError("predict_masked needs a masked (bidirectional) generator; this GPT is causal "
                             "(use teacher forcing: generator(tokens, labels))")
        pred = self.ar(tokens, labels, codebook=self.codebook, token_mask=mask).argmax(-1)
        return bits_to_index(pred) if pred.dim() == 3 else pred  # bitwise head: (B, L, n_bits) bits

    def compile_sampling(self, mode: str = "default") -> None:
        self._decode_fn = torch.compile(self.ar.decode_one, mode=mode, fullgraph=True)

    @torch.no_grad()
    def sample(self, labels: Tensor, cfg_scale: float = 1.0, cfg_schedule: str = "constant", cfg_power: float = 1.0,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
               generator: Optional[torch.Generator] = None, decode_fn: Optional[Callable] = None) -> Tensor:
        """labels (B,) -> codes (B, seq_len): KV-cache sampling with classifier-free guidance
        (system.sampling.ar.generate); `decode_fn` defaults to the compiled step of `compile_sampling`.
        A bidirectional (masked) GPT samples with system.sampling.masked (min(64, seq_len) cosine steps,
        CFG linear in the revealed fraction; the schedule, power and decode_fn do not apply)."""
        if self.masked:
            return generate_masked(self.ar, labels, steps=min(MASKED_STEPS, self.seq_len), cfg_scale=cfg_scale,
                                   temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, seed=seed)
        return generate(self.ar, labels, cfg_scale=cfg_scale, schedule=cfg_schedule, temperature=temperature,
                        top_k=top_k, top_p=top_p, generator=generator, seed=seed, cfg_power=cfg_power,
                        codebook=self.codebook, decode_fn=decode_fn or self._decode_fn)
