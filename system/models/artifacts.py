"""Exported model parts (export I/O) and the protocols sampling, evaluation and VAπ see them through.

An export (a run's `export/` folder, local or s3://) holds, per part `<name>` (e.g. "tokenizer",
"ar"), `<name>.safetensors` (+ `<name>_ema.safetensors` when EMA was kept) and one `model.json`:

    {"<name>": {"kind": "<registered kind>", "config": {<the model config's fields>}}, ...}

e.g. {"tokenizer": {"kind": "tokenizer1d", "config": asdict(Tokenizer1DConfig)},
      "ar": {"kind": "gpt", "config": asdict(GPTConfig)}}.
Exports written before kinds existed ({"tokenizer": {<Tokenizer1DConfig>}, "ar": {<GPTConfig>}})
read as kinds "tokenizer1d" / "gpt".

A kind names how a part is rebuilt. Tokenizers are frozen adapters (`Tokenizer`: encode, decode,
reconstruct, codebook; base `FrozenTokenizer`), each next to its model, and their kinds are
registered in system/models/tokenizers.py (`load_tokenizer`, `register_tokenizer`): "tokenizer1d"
(ours: EOSTok, AliTok; system/models/tokenizer1d.py), "semtok" (system/models/semtok.py) and
"llamagen-vq" (LlamaGen's VQ-16/VQ-8; system/models/adapters_vq.py). Generators wrap a trainable AR
model (`Generator`: teacher-forced logits, `sample`, `masked`); they sample, so their kinds live a
layer up, in system/sampling/generators.py (`load_generator`, `load_pair`, `load_llamagen`,
`register_generator`; kind "gpt": system/sampling/gpt_generator.py).

This module holds no adapter and imports no model, so model files (and every layer above) import it
without a cycle.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Protocol

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from system.config import StorageConfig
from system.data.storage import exists, join, read_bytes, write_bytes_atomic
from system.models import weights

MODEL_JSON = "model.json"
# model.json written before kinds existed: part name -> kind
LEGACY_KINDS = {"tokenizer": "tokenizer1d", "ar": "gpt"}

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


def config_from_dict(cls: type, config: dict, what: str) -> Any:
    """Dataclass `cls` from a JSON dict; unknown fields name the valid ones."""
    valid = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(config) - valid)
    if bad:
        raise ValueError(f"{what}: unknown {cls.__name__} field(s) {bad}; valid fields: {sorted(valid)}")
    return cls(**config)



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

    @property
    def prefix_tokens(self) -> int:
        """Leading 1D codes before the image's codes (AliTok's prefix tokens; 0 for most): an AR model
        over these codes generates them at its prefix positions (GPTConfig.prefix_tokens)."""

    @property
    def unread_prefix(self) -> int:
        """Leading codes the decoder does not read (AliTok's paper stage 2 drops the prefix; 0 for
        most): they change no decoded pixel, so a pixel reward says nothing about them."""

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

    @property
    def prefix_tokens(self) -> int:
        """Leading codes generated before the image grid (AliTok's prefix; 0 for most)."""

    @property
    def masked(self) -> bool:
        """True for a bidirectional (masked) generator (SemTok's masked AR): it predicts hidden positions
        from the whole sequence (`predict_masked`) and samples by iterative unmasking; its `__call__` is
        not next-token teacher forcing. False for a causal (next-token) generator."""

    def __call__(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Teacher forcing: ids (B, L), labels (B,) -> logits (B, L, V); logits[:, i] predicts tokens[:, i]."""

    def predict_masked(self, tokens: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
        """A masked generator's prediction: ids (B, L) with `mask` (B, L) bool positions hidden, labels
        (B,) -> the most likely ids (B, L) at every position; ValueError when not `masked`."""

    def sample(self, labels: Tensor, **sampling) -> Tensor:
        """labels (B,) -> codes (B, seq_len); `sampling`: see GPTGenerator.sample."""

    def compile_sampling(self, mode: str = "default") -> None:
        """torch.compile the per-token step used by `sample`."""

    def state_dict(self, *args, **kwargs) -> dict: ...

    def to(self, *args, **kwargs) -> "Generator": ...


# ---------------------------------------------------------------------------- adapter base, fit
class FrozenTokenizer(nn.Module):
    """Base of the tokenizer adapters: holds the model frozen (eval mode, no gradients). An adapter
    lives next to its model and names its kind, the model class it wraps and how an exported part
    rebuilds it (`from_export`); system/models/tokenizers.py registers the built-in ones."""

    kind: ClassVar[str] = ""  # the registered kind its export is rebuilt with
    wraps: ClassVar[type] = nn.Module  # the raw model class it adapts (frozen_tokenizer)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    @classmethod
    def from_export(cls, config: dict, state_dict: dict[str, Tensor]) -> "FrozenTokenizer":
        """The frozen adapter of an exported part (its model.json config and weights)."""
        raise NotImplementedError(f"{cls.__name__} does not rebuild from an export")

    def artifact(self) -> "Artifact":
        """This tokenizer as an exported part (e.g. beside a post-trained generator)."""
        return Artifact.of(self.kind, self.model)

    def train(self, mode: bool = True) -> "FrozenTokenizer":
        return super().train(False)

    @property
    def codebook(self) -> Optional[Tensor]:
        return None

    @property
    def prefix_tokens(self) -> int:
        return 0

    @property
    def unread_prefix(self) -> int:
        return 0

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        return self.decode(self.encode(images))


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
    check_prefix(generator.prefix_tokens, tokenizer.prefix_tokens)


def check_prefix(ar_prefix: int, tokenizer_prefix: int, key: str = "the AR model") -> None:
    """ValueError unless an AR model generates the tokenizer's prefix codes at its prefix positions
    (AliTok: one prefix count from stage 1 to the AR model to the sampler; the released code uses 17)."""
    if ar_prefix != tokenizer_prefix:
        raise ValueError(f"{key} has {ar_prefix} prefix tokens but the tokenizer's codes start with {tokenizer_prefix} "
                         "prefix codes: they must agree (AliTok: the paper's 16, the released code and weights' 17; "
                         "set the AR model's prefix_tokens, e.g. method.overrides.prefix_tokens)")


# ---------------------------------------------------------------------------- kind tables
# The tokenizer and generator registries (system/models/tokenizers.py, system/sampling/generators.py)
# are each a {kind: builder} table filled from their built-in adapters; these two helpers are shared.
def register_kind(table: dict, what: str, kind: str, builder: Callable) -> None:
    """Add `builder` for `kind` to a registry `table` ("tokenizer" / "generator" is `what`)."""
    if table.get(kind, builder) is not builder:
        raise ValueError(f"{what} kind {kind!r} is already registered (to {table[kind].__qualname__})")
    table[kind] = builder


def build_part(table: dict, what: str, export_url: str, part: str, storage: Optional[StorageConfig], ema: bool,
               *extra) -> nn.Module:
    """Part `part` of an export rebuilt by the builder its kind names in `table`: builder(config, state_dict, *extra);
    state_dict None in plan mode (the architecture only)."""
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


