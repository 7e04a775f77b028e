"""SemTok's tokenizer (../shared/seeds/semtok.txt; ../shared/REFERENCE.md "SemTok"), assembled from
its parts: images -> frozen VAE latents (system/models/vae.py, SD3.5's f = 8, 16 channels) ->
MMDiT encoder (2x2 latent patches with 2D RoPE + K learnable 1D tokens with 1D RoPE, joint
attention; system/models/mmdit.py) -> BSQ over `bits` bits (codes = the bits, 2^bits codebook) ->
MMDiT decoder conditioned on the K quantized tokens -> latents -> VAE decoder -> images.

The decoder (`FlowDecoder`) runs in one of two modes:
- "flow" (stage I): D(x_t, q, t) predicts x - eps for x_t = t eps + (1 - t) x (rectified flow,
  Eq. 5); reconstruction integrates from noise with diffusers' FlowMatchEulerDiscreteScheduler over
  `sample_steps` Euler steps (paper: 25).
- "refiner" (stage II): the noise stream is replaced by learnable mask latents m (`MaskLatents`) and one step at
  t = 1 gives the latents x = m + D(m, q, 1) (the Euler step from t = 1 to 0 of the same
  parameterisation, so a stage I decoder with m = 0, the noise mean, starts at its one-step estimate).

Sizes live in `SEMTOK_PRESETS` (semtok-18 / semtok-32: the paper's 8/768/12 encoder, 24/1536/24
SD3.5-Medium-shaped decoder, K = 256 at 256 px; semtok-tiny: the CPU demo). The fields a preset's
parts share (bits, K, latent channels and size) are set once here by `resolve_semtok_config`.

`SemTokFrozen` is the frozen tokenizer adapter (kind "semtok") of an exported SemTok.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from system.models.artifacts import Artifact, FrozenTokenizer, config_from_dict
from system.models.mmdit import MMDiTDecoder, MMDiTDecoderConfig, MMDiTEncoder, MMDiTEncoderConfig
from system.models.quantizers import BSQuantizer, QuantizerConfig, QuantizerOutput
from system.models.vae import LatentVAE

DECODE_MODES = ("flow", "refiner")


@dataclass
class SemTokConfig:
    image_size: int = 256
    bits: int = 18  # BSQ bits d: codebook 2^d (paper: 18 and 32)
    num_tokens: int = 256  # K 1D tokens per image
    latent_channels: int = 16  # the VAE's (SD3.5: 16)
    downsample: int = 8  # the VAE's spatial factor f
    encoder: MMDiTEncoderConfig = field(default_factory=MMDiTEncoderConfig)
    decoder: MMDiTDecoderConfig = field(default_factory=MMDiTDecoderConfig)
    decode_mode: str = "flow"  # "flow" (stage I: Euler sampler from noise) | "refiner" (stage II: one step from mask latents)
    sample_steps: int = 25  # Euler steps of the flow mode
    bsq_inv_temperature: float = 100.0  # BSQ's soft assignment of the entropy term

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = MMDiTEncoderConfig(**self.encoder)
        if isinstance(self.decoder, dict):
            self.decoder = MMDiTDecoderConfig(**self.decoder)
        if self.decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode {self.decode_mode!r}; expected one of {DECODE_MODES}")
        if self.image_size % (self.downsample * self.encoder.patch_size):
            raise ValueError(f"image_size {self.image_size} is not a multiple of the VAE factor {self.downsample} x "
                             f"patch size {self.encoder.patch_size}")

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def vocab_size(self) -> int:
        return 1 << self.bits

    @property
    def bits_per_pixel(self) -> float:
        """log2|C| x K / (H W): the paper's compression ratio."""
        return self.bits * self.num_tokens / self.image_size**2

    def quantizer_config(self, entropy_weight: float = 0.0, commit_weight: float = 0.0, entropy_group: int = 1) -> QuantizerConfig:
        return QuantizerConfig(type="bsq", dim=self.bits, entropy_weight=entropy_weight, commit_weight=commit_weight,
                               bsq_inv_temperature=self.bsq_inv_temperature, entropy_group=entropy_group)


def resolve_semtok_config(cfg: SemTokConfig) -> SemTokConfig:
    """The encoder and decoder configs made consistent with the shared fields (bits, K, the VAE's
    channels and latent size)."""
    enc = dataclasses.replace(cfg.encoder, in_channels=cfg.latent_channels, latent_size=cfg.latent_size,
                              num_tokens=cfg.num_tokens, token_dim=cfg.bits)
    dec = dataclasses.replace(cfg.decoder, in_channels=cfg.latent_channels, token_dim=cfg.bits)
    return dataclasses.replace(cfg, encoder=enc, decoder=dec)


_TINY_ENCODER = dict(depth=2, width=128, heads=4)
_TINY_DECODER = dict(depth=3, heads=4, head_dim=32, dual_attention_layers=(), pos_embed_max_size=16, sample_size=8)
SEMTOK_PRESETS: dict[str, dict] = {
    "semtok-18": dict(bits=18),
    "semtok-32": dict(bits=32),
    # the CPU demo: 64 px -> 8 x 8 x 16 latents (the demo's own small VAE) -> 16 patches; 32 tokens x 18 bits
    "semtok-tiny": dict(image_size=64, bits=18, num_tokens=32, sample_steps=10,
                        encoder=_TINY_ENCODER, decoder=_TINY_DECODER),
}


def semtok_config(name: str) -> SemTokConfig:
    """A preset by exact name (KeyError naming the presets)."""
    if name not in SEMTOK_PRESETS:
        raise KeyError(f"unknown SemTok preset {name!r}; presets: {sorted(SEMTOK_PRESETS)}")
    p = dict(SEMTOK_PRESETS[name])
    enc, dec = p.pop("encoder", {}), p.pop("decoder", {})
    return SemTokConfig(**p, encoder=MMDiTEncoderConfig(**enc), decoder=MMDiTDecoderConfig(**dec))


# --------------------------------------------------------------------------- parts
class MaskLatents(nn.Module):
    """Stage II's learnable mask latents m (1, C, h, w), initialised to 0 (the mean of the noise they
    replace). A module of its own so ZeRO-3 gathers m in its forward."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, channels, size, size))

    def forward(self, batch: int) -> Tensor:  # -> (B, C, h, w)
        return self.latents.expand(batch, -1, -1, -1)


class FlowDecoder(nn.Module):
    """The MMDiT decoder with its two modes (module doc). `mask` (MaskLatents) exists in refiner mode only."""

    def __init__(self, cfg: SemTokConfig):
        super().__init__()
        self.cfg = cfg
        self.mmdit = MMDiTDecoder(cfg.decoder)
        self.mask = MaskLatents(cfg.latent_channels, cfg.latent_size) if cfg.decode_mode == "refiner" else None

    def forward(self, x_t: Tensor, quantized: Tensor, t: Tensor) -> Tensor:
        """x_t (B, C, h, w), quantized tokens (B, K, bits), t (B,) in [0, 1] -> x - eps prediction (B, C, h, w)."""
        return self.mmdit(x_t, quantized, t)

    def refine(self, quantized: Tensor) -> Tensor:
        """Refiner mode: quantized (B, K, bits) -> latents (B, C, h, w) in one step from the mask latents."""
        m = self.mask(quantized.shape[0])
        t = torch.ones(quantized.shape[0], device=quantized.device)
        return m + self.mmdit(m, quantized, t)

    @torch.no_grad()
    def sample(self, quantized: Tensor, steps: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Flow mode: latents from noise by `steps` Euler steps (diffusers' flow-matching scheduler)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        c = self.cfg
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        sched.set_timesteps(steps, device=quantized.device)
        shape = (quantized.shape[0], c.latent_channels, c.latent_size, c.latent_size)
        x = torch.randn(shape, generator=generator, device=quantized.device if generator is None else generator.device)
        x = x.to(quantized.device, torch.float32)  # the state and t stay fp32 (the decoder may run in bf16)
        for ts in sched.timesteps:
            t = (ts.float() / sched.config.num_train_timesteps).expand(x.shape[0])
            velocity = -self.mmdit(x, quantized, t).float()  # d x_t / d t = eps - x
            x = sched.step(velocity, ts, x).prev_sample
        return x

    def decode(self, quantized: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """quantized tokens -> latents in this decoder's mode."""
        if self.cfg.decode_mode == "refiner":
            return self.refine(quantized)
        return self.sample(quantized, self.cfg.sample_steps, generator)


def flow_matching_loss(decoder: nn.Module, latents: Tensor, quantized: Tensor, t: Optional[Tensor] = None,
                       noise: Optional[Tensor] = None) -> Tensor:
    """Eq. 5: E ||x - eps - D(x_t, q, t)||^2 with x_t = t eps + (1 - t) x, t ~ U[0, 1] per sample."""
    b = latents.shape[0]
    t = torch.rand(b, device=latents.device) if t is None else t
    eps = torch.randn_like(latents) if noise is None else noise
    tt = t.view(b, 1, 1, 1).to(latents.dtype)
    x_t = tt * eps + (1 - tt) * latents
    pred = decoder(x_t, quantized, t.to(latents.dtype))
    return torch.mean((latents - eps - pred).float() ** 2)


class EncodeOutput(NamedTuple):
    quant: QuantizerOutput  # codes (B, K), quantized (B, K, bits) straight-through, losses
    image: Tensor  # (B, N, width) the encoder's 2D stream (semantic distillation)
    grid: tuple[int, int]  # the 2D stream's patch grid


class SemTokEncoder(nn.Module):
    """MMDiT encoder + BSQ (no parameters): latents -> tokens."""

    def __init__(self, cfg: SemTokConfig, quantizer: Optional[QuantizerConfig] = None):
        super().__init__()
        self.cfg = cfg
        self.mmdit = MMDiTEncoder(cfg.encoder)
        self.quantizer = BSQuantizer(quantizer or cfg.quantizer_config())

    def forward(self, latents: Tensor, batch_mean=None) -> EncodeOutput:
        """latents (B, C, h, w) -> EncodeOutput; `batch_mean` maps the local mean bit probabilities to
        the global batch's (the entropy term over all ranks)."""
        out = self.mmdit(latents)
        return EncodeOutput(self.quantizer(out.tokens, batch_mean=batch_mean), out.image, tuple(out.grid))


class SemTok(nn.Module):
    """The whole tokenizer (the exported part): VAE + encoder + BSQ + decoder."""

    def __init__(self, cfg: SemTokConfig, vae: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.vae = vae
        self.encoder = SemTokEncoder(cfg)
        self.decoder = FlowDecoder(cfg)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> codes (B, K) int64."""
        return self.encoder(self.vae.encode(images)).quant.codes

    def embed_codes(self, codes: Tensor) -> Tensor:
        """codes (B, K) -> BSQ vectors (B, K, bits) with entries +-1/sqrt(bits)."""
        return self.encoder.quantizer.embed_codes(codes)

    @torch.no_grad()
    def decode_codes(self, codes: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """codes (B, K) -> images (B, 3, H, W)."""
        q = self.embed_codes(codes).to(next(self.decoder.parameters()).dtype)
        return self.vae.decode(self.decoder.decode(q, generator)).float()

    @torch.no_grad()
    def forward(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """images -> reconstructions (B, 3, H, W)."""
        quant = self.encoder(self.vae.encode(images)).quant
        return self.vae.decode(self.decoder.decode(quant.quantized, generator)).float()


def bit_usage(bit_means: Tensor, lo: float = 0.1, hi: float = 0.9) -> Tensor:
    """Fraction of bits whose mean over the codes lies in [lo, hi] (a bit stuck near 0 or 1 carries
    almost no information); a 0-dim tensor on bit_means' device (no host sync)."""
    return ((bit_means >= lo) & (bit_means <= hi)).float().mean()


# ---------------------------------------------------------------------------- the frozen adapter
def semtok_config_from_dict(config: dict) -> tuple[SemTokConfig, dict]:
    """(SemTokConfig, the VAE's config dict) of a "semtok" part's model.json config."""
    d = dict(config)
    vae = d.pop("vae")
    return config_from_dict(SemTokConfig, d, "semtok"), vae


def semtok_part_config(cfg: SemTokConfig, vae_config: dict) -> dict:
    """model.json config of a "semtok" part: the SemTokConfig's fields plus the VAE's config."""
    return {**dataclasses.asdict(cfg), "vae": vae_config}


class SemTokFrozen(FrozenTokenizer):
    """SemTok (kind "semtok"): VAE + MMDiT encoder + BSQ + MMDiT decoder.
    No codebook: its AR model (bitwise head) embeds codes through their bits. Decoding in flow mode
    (a stage I export) draws noise: `decode` is then stochastic; a stage II export decodes in one step."""

    kind = "semtok"
    wraps = SemTok
    model: SemTok

    @classmethod
    def from_export(cls, config: dict, state_dict: Optional[dict[str, Tensor]]) -> "SemTokFrozen":
        """SemTok with its weights (the VAE rebuilt from its config dict), frozen; `state_dict` None:
        the architecture only (plan mode)."""
        cfg, vae_cfg = semtok_config_from_dict(config)
        model = SemTok(cfg, LatentVAE.from_config_dict(vae_cfg))
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return cls(model.eval())

    def artifact(self) -> Artifact:
        return Artifact(self.kind, semtok_part_config(self.model.cfg, self.model.vae.config_dict()),
                        dict(self.model.state_dict()))

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    @property
    def image_size(self) -> int:
        return self.model.cfg.image_size

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        return self.model.encode(images)  # (B, K)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        return self.model.decode_codes(codes)  # (B, 3, H, W)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        return self.model(images)

    def num_tokens(self, resolution: int) -> int:
        if resolution != self.image_size:
            raise ValueError(f"this SemTok tokenizer works at {self.image_size} px, not {resolution}; "
                             f"set data.resolution={self.image_size}")
        return self.model.cfg.num_tokens

    def image_size_for(self, num_tokens: int) -> int:
        if num_tokens != self.model.cfg.num_tokens:
            raise ValueError(f"this SemTok tokenizer gives {self.model.cfg.num_tokens} codes per image, not {num_tokens}")
        return self.image_size
