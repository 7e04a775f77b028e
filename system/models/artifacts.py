"""Exported model parts and the protocols sampling, evaluation and VAπ see them through.

An export (a run's `export/` folder, local or s3://) holds, per part `<name>` (e.g. "tokenizer",
"ar"), `<name>.safetensors` (+ `<name>_ema.safetensors` when EMA was kept) and one `model.json`:

    {"<name>": {"kind": "<registered kind>", "config": {<the model config's fields>}}, ...}

e.g. {"tokenizer": {"kind": "tokenizer1d", "config": asdict(Tokenizer1DConfig)},
      "ar": {"kind": "gpt", "config": asdict(GPTConfig)}}.
Exports written before kinds existed ({"tokenizer": {<Tokenizer1DConfig>}, "ar": {<GPTConfig>}})
read as kinds "tokenizer1d" / "gpt".

A kind names how a part is rebuilt: `register_tokenizer(kind, builder)` /
`register_generator(kind, builder)`. Tokenizers are frozen adapters (`Tokenizer`: encode, decode,
reconstruct, codebook); generators wrap a trainable AR model plus, when it embeds codes through
it, the tokenizer's codebook (`Generator`: teacher-forced logits, `sample`). Registered here:
tokenizers "tokenizer1d" (ours: EOSTok, AliTok), "semtok" (SemTok: VAE + MMDiT) and "llamagen-vq"
(LlamaGen's VQ-16/VQ-8);
generator "gpt" (ours and LlamaGen's c2i GPT after its state-dict adapter). LlamaGen's public
checkpoints load directly with `load_llamagen`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Protocol

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from system.config import StorageConfig
from system.data.storage import exists, join, read_bytes, write_bytes_atomic
from system.models import weights
from system.models.adapters_llamagen_gpt import load_llamagen_gpt
from system.models.adapters_vq import load_llamagen_vq
from system.models.gpt import GPT, GPTConfig
from system.models.quantizers import QuantizerConfig
from system.models.tokenizer1d import Tokenizer1D, Tokenizer1DConfig
from system.models.vqgan import VQGANConfig, VQModel
from system.sampling.ar import generate

MODEL_JSON = "model.json"
# model.json written before kinds existed: part name -> kind
LEGACY_KINDS = {"tokenizer": "tokenizer1d", "ar": "gpt"}
MASKED_STEPS = 64  # sampling steps of a bidirectional (masked) GPT (SemTok: 64, cosine)

WriteBytes = Callable[[str, bytes], None]  # (name relative to the export folder, bytes) -> None


# ---------------------------------------------------------------------------- artifacts + model.json
@dataclass
class Artifact:
    """One exported part: its kind, its model config (JSON-able) and its weights."""

    kind: str
    config: dict
    state_dict: dict[str, Tensor]

    @classmethod
    def of(cls, kind: str, model: nn.Module) -> "Artifact":
        """A model whose `cfg` is its config dataclass (Tokenizer1D, GPT, VQModel) -> Artifact."""
        return cls(kind, dataclasses.asdict(model.cfg), dict(model.state_dict()))


def model_json_bytes(artifacts: dict[str, Artifact]) -> bytes:
    """model.json: {"<name>": {"kind": ..., "config": {...}}, ...}."""
    return json.dumps({n: {"kind": a.kind, "config": a.config} for n, a in artifacts.items()}, indent=1,
                      sort_keys=True).encode()


def write_model_json(write_bytes: WriteBytes, artifacts: dict[str, Artifact]) -> None:
    write_bytes(MODEL_JSON, model_json_bytes(artifacts))


def write_export(write_bytes: WriteBytes, artifacts: dict[str, Artifact], suffix: str = "",
                 metadata: Optional[dict] = None) -> None:
    """Each part's weights as `<name><suffix>.safetensors` (suffix "" or "_ema") through `write_bytes`;
    the safetensors metadata holds `metadata` plus the part's name and kind."""
    for name, a in artifacts.items():
        meta = {**{k: str(v) for k, v in (metadata or {}).items()}, "part": name, "kind": a.kind}
        tensors = {k: v.detach().cpu().contiguous() for k, v in a.state_dict.items()}
        write_bytes(f"{name}{suffix}.safetensors", safetensors_bytes(tensors, metadata=meta))


def export_writer(export_url: str, storage: Optional[StorageConfig] = None) -> WriteBytes:
    """A `write_bytes` for `write_export` / `write_model_json` that writes atomically under `export_url`."""
    return lambda name, data: write_bytes_atomic(join(export_url, name), data, storage)


def save_export(export_url: str, artifacts: dict[str, Artifact], storage: Optional[StorageConfig] = None) -> str:
    """Weights + model.json of `artifacts` under `export_url` (a folder or s3:// prefix); returns it."""
    write = export_writer(export_url, storage)
    write_export(write, artifacts)
    write_model_json(write, artifacts)
    return export_url


def read_model_json(export_url: str, storage: Optional[StorageConfig] = None) -> dict[str, dict]:
    """{"<name>": {"kind": ..., "config": {...}}} of an export (old kind-less files mapped to kinds)."""
    url = join(export_url, MODEL_JSON)
    try:
        raw = json.loads(read_bytes(url, storage))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} not found: is {export_url} the export/ folder of a finished run?") from None
    parts = {}
    for name, entry in raw.items():
        if isinstance(entry, dict) and "kind" in entry and "config" in entry:
            parts[name] = {"kind": entry["kind"], "config": entry["config"]}
        elif isinstance(entry, dict) and name in LEGACY_KINDS:
            parts[name] = {"kind": LEGACY_KINDS[name], "config": entry}
        else:
            raise ValueError(f"{url}: part {name!r} has no kind; expected {{\"kind\": ..., \"config\": {{...}}}} "
                             f"(kind-less entries are read only for the parts {sorted(LEGACY_KINDS)})")
    return parts


def model_part(export_url: str, part: str, storage: Optional[StorageConfig] = None) -> dict:
    """{"kind": ..., "config": {...}} of one part of an export's model.json."""
    parts = read_model_json(export_url, storage)
    if part not in parts:
        raise KeyError(f"{join(export_url, MODEL_JSON)} has no part {part!r}; it has {sorted(parts)}")
    return parts[part]


def load_part(export_url: str, part: str, storage: Optional[StorageConfig] = None, ema: bool = True) -> dict[str, Tensor]:
    """State dict of one exported part; the EMA copy when present and `ema`."""
    names = [f"{part}_ema.safetensors", f"{part}.safetensors"] if ema else [f"{part}.safetensors"]
    for name in names:
        url = join(export_url, name)
        if exists(url, storage):
            return load_safetensors_bytes(read_bytes(url, storage))
    raise FileNotFoundError(f"no {' or '.join(names)} under {export_url}")


# ---------------------------------------------------------------------------- protocols
class Tokenizer(Protocol):
    """A frozen image tokenizer (eval mode, no gradients)."""

    @property
    def codebook(self) -> Optional[Tensor]:
        """(V, D) code vectors when a generator embeds codes through them; None when it has its own table."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def image_size(self) -> Optional[int]:
        """The one resolution it takes; None when any multiple of its downsampling works."""

    def encode(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> codes (B, L) int64."""

    def decode(self, codes: Tensor) -> Tensor:
        """codes (B, L) -> images (B, 3, H, W) in about [-1, 1]."""

    def reconstruct(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> the tokenizer's reconstruction (B, 3, H, W) (PSNR, rFID)."""

    def num_tokens(self, resolution: int) -> int:
        """Codes per image at `resolution` px; ValueError naming data.resolution when it cannot take that size."""

    def image_size_for(self, num_tokens: int) -> int:
        """The resolution whose images give `num_tokens` codes; ValueError when none does."""

    def to(self, *args, **kwargs) -> "Tokenizer": ...


class Generator(Protocol):
    """A class-conditional AR generator over a tokenizer's codes; `ar` is the trainable module and
    `state_dict()` holds its weights only."""

    ar: nn.Module

    @property
    def vocab_size(self) -> int: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    @property
    def seq_len(self) -> int:
        """Codes generated per sample (prefix + block_size)."""

    def __call__(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Teacher forcing: ids (B, L), labels (B,) -> logits (B, L, V); logits[:, i] predicts tokens[:, i]."""

    def sample(self, labels: Tensor, **sampling) -> Tensor:
        """labels (B,) -> codes (B, seq_len); `sampling`: see GPTGenerator.sample."""

    def compile_sampling(self, mode: str = "default") -> None:
        """torch.compile the per-token step used by `sample`."""

    def state_dict(self, *args, **kwargs) -> dict: ...

    def to(self, *args, **kwargs) -> "Generator": ...


# ---------------------------------------------------------------------------- tokenizer adapters
class FrozenTokenizer(nn.Module):
    """Base of the tokenizer adapters: holds the model frozen (eval mode, no gradients)."""

    kind: ClassVar[str] = ""  # the registered kind its export is rebuilt with

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    def artifact(self) -> "Artifact":
        """This tokenizer as an exported part (e.g. beside a post-trained generator)."""
        return Artifact.of(self.kind, self.model)

    def train(self, mode: bool = True) -> "FrozenTokenizer":
        return super().train(False)

    @property
    def codebook(self) -> Optional[Tensor]:
        return None

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        return self.decode(self.encode(images))


class Tokenizer1DFrozen(FrozenTokenizer):
    """Our 1D tokenizer (kind "tokenizer1d": EOSTok, AliTok); its codebook feeds the AR input embedding."""

    kind = "tokenizer1d"
    model: Tokenizer1D

    @property
    def codebook(self) -> Tensor:
        return self.model.codebook  # (V, D)

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.quantizer.num_codes

    @property
    def image_size(self) -> int:
        return self.model.cfg.image_size

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        quant, _ = self.model.encode(images)
        return quant.codes  # (B, P+L)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        return self.model.decode_codes(codes)  # (B, 3, H, W)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        return self.model(images).image

    def num_tokens(self, resolution: int) -> int:
        if resolution != self.image_size:
            raise ValueError(f"this 1D tokenizer works at {self.image_size} px, not {resolution}; "
                             f"set data.resolution={self.image_size}")
        return self.model.cfg.seq_len

    def image_size_for(self, num_tokens: int) -> int:
        if num_tokens != self.model.cfg.seq_len:
            raise ValueError(f"this 1D tokenizer gives {self.model.cfg.seq_len} codes per image, not {num_tokens}")
        return self.image_size


class VQFrozen(FrozenTokenizer):
    """LlamaGen's VQ (kind "llamagen-vq"): a 2D grid of codes in raster order; the GPT embeds ids
    with its own table (no codebook)."""

    kind = "llamagen-vq"
    model: VQModel

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.codebook_size

    @property
    def image_size(self) -> None:
        return None

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        return self.model.encode(images).flatten(1)  # (B, h*w)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        return self.model.decode_codes(codes)  # (B, 3, h*f, w*f)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        return self.model(images)[0]

    def num_tokens(self, resolution: int) -> int:
        f = self.model.cfg.downsample
        if resolution % f:
            raise ValueError(f"data.resolution={resolution} is not a multiple of the VQ's downsampling factor {f}")
        return (resolution // f) ** 2

    def image_size_for(self, num_tokens: int) -> int:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"the VQ gives a square grid of codes; {num_tokens} codes is not a square")
        return side * self.model.cfg.downsample


class SemTokFrozen(FrozenTokenizer):
    """SemTok (kind "semtok"; system/models/semtok.py): VAE + MMDiT encoder + BSQ + MMDiT decoder.
    No codebook: its AR model (bitwise head) embeds codes through their bits. Decoding in flow mode
    (a stage I export) draws noise: `decode` is then stochastic; a stage II export decodes in one step."""

    kind = "semtok"

    def artifact(self) -> "Artifact":
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


_FROZEN_ADAPTERS: dict[type, type[FrozenTokenizer]] = {Tokenizer1D: Tokenizer1DFrozen, VQModel: VQFrozen}


def frozen_tokenizer(model: nn.Module) -> FrozenTokenizer:
    """A raw tokenizer model (Tokenizer1D, VQModel) -> its frozen adapter (adapters pass through)."""
    if isinstance(model, FrozenTokenizer):
        return model
    for cls, adapter in _FROZEN_ADAPTERS.items():
        if isinstance(model, cls):
            return adapter(model)
    raise TypeError(f"no tokenizer adapter for {type(model).__name__}; expected one of "
                    f"{[c.__name__ for c in _FROZEN_ADAPTERS]}")


# ---------------------------------------------------------------------------- generator adapter
class GPTGenerator(nn.Module):
    """Our GPT (kind "gpt"; LlamaGen's c2i GPT loads into it) plus the frozen codebook it embeds
    codes through when its config has `code_dim` (EOSTok). state_dict() holds the AR weights only
    ("ar.*"); the AR model stays trainable (VAπ trains it)."""

    def __init__(self, ar: GPT, codebook: Optional[Tensor] = None):
        super().__init__()
        self.ar = ar
        needs = ar.code_proj is not None
        if needs and codebook is None:
            raise ValueError(f"this GPT embeds codes through a codebook (GPTConfig.code_dim={ar.cfg.code_dim}): "
                             "pass the tokenizer's codebook (e.g. load_generator(..., tokenizer=...) or load_pair)")
        self.register_buffer("codebook", codebook.detach().clone() if needs else None, persistent=False)
        self._decode_fn: Optional[Callable] = None

    def artifact(self) -> "Artifact":
        """The AR model as an exported part of kind "gpt"."""
        return Artifact.of("gpt", self.ar)

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

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Teacher forcing: input ids (B, L), labels (B,) -> logits (B, L, V) for every position."""
        return self.ar(tokens, labels, codebook=self.codebook)

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
        if self.ar.cfg.bidirectional:
            from system.sampling.masked import generate_masked

            return generate_masked(self.ar, labels, steps=min(MASKED_STEPS, self.seq_len), cfg_scale=cfg_scale,
                                   temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, seed=seed)
        return generate(self.ar, labels, cfg_scale=cfg_scale, schedule=cfg_schedule, temperature=temperature,
                        top_k=top_k, top_p=top_p, generator=generator, seed=seed, cfg_power=cfg_power,
                        codebook=self.codebook, decode_fn=decode_fn or self._decode_fn)


def check_fit(generator: Generator, tokenizer: Tokenizer, resolution: int) -> None:
    """ValueError unless the generator samples exactly the tokenizer's code sequence at `resolution`."""
    n = tokenizer.num_tokens(resolution)
    if n != generator.seq_len:
        raise ValueError(f"the tokenizer gives {n} codes per {resolution} px image but the AR model generates "
                         f"{generator.seq_len} (e.g. LlamaGen's 384 px checkpoints need method.gpt_overrides.block_size=576 "
                         "and data.resolution=384)")
    if tokenizer.vocab_size != generator.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} codes but the AR model's vocabulary is "
                         f"{generator.vocab_size}")


# ---------------------------------------------------------------------------- kind registry
# (config, state_dict) -> Tokenizer; state_dict None (plan mode): the architecture without weights
TokenizerBuilder = Callable[[dict, Optional[dict]], Tokenizer]
GeneratorBuilder = Callable[[dict, Optional[dict], Optional[Tokenizer]], Generator]  # (config, state_dict, tokenizer) -> Generator
_TOKENIZERS: dict[str, TokenizerBuilder] = {}
_GENERATORS: dict[str, GeneratorBuilder] = {}


def _register(table: dict, what: str, kind: str, builder: Callable) -> None:
    if table.get(kind, builder) is not builder:
        raise ValueError(f"{what} kind {kind!r} is already registered (to {table[kind].__qualname__})")
    table[kind] = builder


def register_tokenizer(kind: str, builder: TokenizerBuilder) -> None:
    """builder(config dict, state_dict) -> Tokenizer (a frozen nn.Module adapter)."""
    _register(_TOKENIZERS, "tokenizer", kind, builder)


def register_generator(kind: str, builder: GeneratorBuilder) -> None:
    """builder(config dict, state_dict, tokenizer or None) -> Generator; the tokenizer gives the
    codebook to generators that embed codes through it."""
    _register(_GENERATORS, "generator", kind, builder)


def tokenizer_kinds() -> list[str]:
    return sorted(_TOKENIZERS)


def generator_kinds() -> list[str]:
    return sorted(_GENERATORS)


def config_from_dict(cls: type, config: dict, what: str) -> Any:
    """Dataclass `cls` from a JSON dict; unknown fields name the valid ones."""
    valid = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(config) - valid)
    if bad:
        raise ValueError(f"{what}: unknown {cls.__name__} field(s) {bad}; valid fields: {sorted(valid)}")
    return cls(**config)


def tokenizer1d_config(config: dict) -> Tokenizer1DConfig:
    """The Tokenizer1DConfig of a tokenizer1d part's model.json config."""
    cfg = dict(config)
    cfg["quantizer"] = config_from_dict(QuantizerConfig, cfg["quantizer"], "tokenizer1d quantizer")
    return config_from_dict(Tokenizer1DConfig, cfg, "tokenizer1d")


def build_tokenizer1d(config: dict, state_dict: Optional[dict[str, Tensor]]) -> Tokenizer1D:
    """Our Tokenizer1D with its weights (trainable, eval mode)."""
    model = Tokenizer1D(tokenizer1d_config(config))
    if state_dict is not None:  # None: plan mode, the architecture only
        model.load_state_dict(state_dict)
    return model.eval()


def semtok_config_from_dict(config: dict) -> tuple[Any, dict]:
    """(SemTokConfig, the VAE's config dict) of a "semtok" part's model.json config."""
    from system.models.semtok import SemTokConfig

    d = dict(config)
    vae = d.pop("vae")
    return config_from_dict(SemTokConfig, d, "semtok"), vae


def semtok_part_config(cfg: Any, vae_config: dict) -> dict:
    """model.json config of a "semtok" part: the SemTokConfig's fields plus the VAE's config."""
    return {**dataclasses.asdict(cfg), "vae": vae_config}


def build_semtok(config: dict, state_dict: Optional[dict[str, Tensor]]) -> SemTokFrozen:
    """SemTok with its weights, frozen (diffusers is imported only here)."""
    from system.models.semtok import SemTok
    from system.models.vae import LatentVAE

    cfg, vae_cfg = semtok_config_from_dict(config)
    model = SemTok(cfg, LatentVAE.from_config_dict(vae_cfg))
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return SemTokFrozen(model.eval())


def build_gpt(config: dict, state_dict: Optional[dict[str, Tensor]]) -> GPT:
    """Our GPT with its weights (trainable, eval mode)."""
    model = GPT(config_from_dict(GPTConfig, config, "gpt"))
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


register_tokenizer("tokenizer1d", lambda config, sd: Tokenizer1DFrozen(build_tokenizer1d(config, sd)))
register_tokenizer("llamagen-vq", lambda config, sd: VQFrozen(
    load_llamagen_vq(sd, config_from_dict(VQGANConfig, config, "llamagen-vq")) if sd is not None
    else VQModel(config_from_dict(VQGANConfig, config, "llamagen-vq")).eval()))
register_tokenizer("semtok", build_semtok)
register_generator("gpt", lambda config, sd, tok: GPTGenerator(
    build_gpt(config, sd), tok.codebook if tok is not None and config.get("code_dim") else None))


# ---------------------------------------------------------------------------- loaders
def _build(table: dict, what: str, export_url: str, part: str, storage, ema: bool, *extra) -> nn.Module:
    entry = model_part(export_url, part, storage)
    kind = entry["kind"]
    if kind not in table:
        raise ValueError(f"part {part!r} of {export_url} has {what} kind {kind!r}, which is not registered; "
                         f"registered {what} kinds: {sorted(table)} (add one with register_{what})")
    # plan mode (system/models/weights.py): model.json only, the builder makes the architecture (state dict None)
    sd = load_part(export_url, part, storage, ema) if weights.need(f"{what} {part!r} of an export", export_url) else None
    try:
        return table[kind](entry["config"], sd, *extra)
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"cannot build part {part!r} (kind {kind!r}) of {export_url}: {e}") from e


def load_tokenizer(export_url: str, storage: Optional[StorageConfig] = None, ema: bool = True,
                   device: str | torch.device = "cpu", part: str = "tokenizer") -> Tokenizer:
    """The frozen tokenizer of an export (EMA weights when present and `ema`)."""
    return _build(_TOKENIZERS, "tokenizer", export_url, part, storage, ema).to(device)


def load_generator(export_url: str, tokenizer: Optional[Tokenizer] = None, storage: Optional[StorageConfig] = None,
                   ema: bool = True, device: str | torch.device = "cpu", part: str = "ar") -> Generator:
    """The generator of an export, in eval mode; `tokenizer` supplies the codebook when the
    generator embeds codes through it (kind "gpt" with code_dim)."""
    return _build(_GENERATORS, "generator", export_url, part, storage, ema, tokenizer).to(device).eval()


def load_pair(export_url: str, storage: Optional[StorageConfig] = None, ema: bool = True,
              device: str | torch.device = "cpu", tokenizer_part: str = "tokenizer",
              generator_part: str = "ar") -> tuple[Tokenizer, Generator]:
    """(tokenizer, generator) of an export of any registered kinds."""
    tok = load_tokenizer(export_url, storage, ema, device, tokenizer_part)
    return tok, load_generator(export_url, tok, storage, ema, device, generator_part)


def load_llamagen(gpt_path: str | dict, vq_path: str | dict, preset: Optional[str] = None,
                  **gpt_overrides) -> tuple[Tokenizer, Generator]:
    """(tokenizer, generator) from LlamaGen's public checkpoints (paths or loaded dicts), on CPU:
    a VQ (vq_ds16_c2i.pt) and a c2i GPT; `preset` (a llamagen-* name, inferred from the weights
    when None) and `gpt_overrides` (e.g. block_size=576 for 384 px) set the GPTConfig."""
    tok = VQFrozen(load_llamagen_vq(vq_path))
    return tok, GPTGenerator(load_llamagen_gpt(gpt_path, name=preset, **gpt_overrides).eval())
