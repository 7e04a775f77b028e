"""Token shard format: pre-tokenized images as WebDataset shards next to the image shards.

Same layout, markers and index as image shards (system/data/shards.py), so the same reader
machinery (units, streams, resumable positions) reads them. Per sample, in tar order:

    <key>.tok   the codes: raw little-endian integers, dtype and length from the index
    <key>.cls   the class label, ASCII decimal
    <key>.aug   the augmentation id, ASCII decimal (0: none; see AUGMENTATIONS)

`key` is `<source key>_a<aug>`, unique in the set: every (source sample, augmentation) pair is one
token sample. The index adds a `tokens` section to the image index:

    {"version": 1, "split", "shards": [...], "num_samples", "classes": {...},
     "tokens": {"dtype": "uint16", "seq_len": 256, "vocab_size": 4096, "augment": "flip",
                "tokenizer": {"kind": ..., "url": ..., "fingerprint": ...}}}

Writing: `TokenShardPlan` + `write_token_shard` (tar, then its `.done.json` marker, through
shards.write_tar) + `write_token_index` (last, listing only complete shards); `write_token_set`
writes a whole set from arrays (tests, tools). Reading: system/data/stream.py `TokenShardReader`.
Pre-tokenizing image shards, and the storage cost per view: system/encode/pretokenize.py.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Iterator, Optional

import numpy as np

from system.config.sections import StorageConfig
from system.data.shards import done_marker, shard_name, write_index, write_tar
from system.data.storage import join

TOKEN_FIELDS = ("tok", "cls", "aug")

# augmentation mode -> number of views per image (view ids 0..n-1). ten-crop: LlamaGen's
# pre-tokenization (4 corners + centre of the 1.1x-resized image, each also mirrored).
AUGMENTATIONS: dict[str, int] = {"none": 1, "flip": 2, "ten-crop": 10}


def token_dtype(vocab_size: int) -> np.dtype:
    """The compact integer dtype for codes < vocab_size: uint16 up to 2^16 codes, int32 up to 2^31,
    int64 beyond (SemTok's 2^32 BSQ codebook)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    return np.dtype("<i4") if vocab_size <= 1 << 31 else np.dtype("<i8")


def token_key(source_key: str, aug: int) -> str:
    return f"{source_key}_a{aug}"


def encode_token_sample(codes: np.ndarray, label: int, aug: int, dtype: np.dtype) -> dict[str, bytes]:
    """One token sample's tar members {ext: bytes} (codes (L,) integers)."""
    codes = np.asarray(codes)
    if codes.ndim != 1:
        raise ValueError(f"codes must be one sequence (L,), got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() > np.iinfo(dtype).max):
        raise ValueError(f"codes out of range for {dtype}: [{codes.min()}, {codes.max()}]")
    return {"tok": codes.astype(dtype).tobytes(), "cls": str(int(label)).encode(), "aug": str(int(aug)).encode()}


def decode_token_sample(fields: dict[str, bytes], dtype: np.dtype, seq_len: int) -> tuple[np.ndarray, int, int]:
    """tar members -> (codes int64 (L,), label, aug); ValueError on a malformed sample."""
    missing = [f for f in ("tok", "cls") if f not in fields]
    if missing:
        raise ValueError(f"token sample lacks {missing} (fields: {sorted(fields)})")
    codes = np.frombuffer(fields["tok"], dtype=dtype)
    if codes.size != seq_len:
        raise ValueError(f"token sample has {codes.size} codes, the index says seq_len {seq_len}")
    return codes.astype(np.int64), int(fields["cls"]), int(fields.get("aug", b"0"))


def token_meta(index: dict[str, Any], url: str = "") -> dict[str, Any]:
    """The `tokens` section of a token-shard index; ValueError (naming `url`) for an image index."""
    meta = index.get("tokens")
    if not isinstance(meta, dict) or not {"dtype", "seq_len", "vocab_size"} <= set(meta):
        raise ValueError(f"{url or 'index'} is not a token-shard index (no tokens section with dtype, seq_len, "
                         "vocab_size): write one with jobs/pretokenize.py")
    return meta


def token_section(vocab_size: int, seq_len: int, augment: str, tokenizer: dict[str, Any]) -> dict[str, Any]:
    """The index's `tokens` section for codes < vocab_size of length seq_len."""
    check_augment(augment)
    return {"dtype": token_dtype(vocab_size).name, "seq_len": int(seq_len), "vocab_size": int(vocab_size),
            "augment": augment, "tokenizer": dict(tokenizer)}


def meta_dtype(meta: dict[str, Any]) -> np.dtype:
    """The little-endian code dtype a `tokens` section names."""
    return np.dtype(meta["dtype"]).newbyteorder("<")


def check_augment(augment: str) -> int:
    """Views per image of an augmentation mode; ValueError naming the known modes."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {augment!r}; expected one of {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[augment]


@dataclass
class TokenShardPlan:
    """One token shard: the codes of every view of one input (image) shard. Its fingerprint
    covers the input's content id, the tokenizer's fingerprint and the augmentation, so a
    re-run rewrites a shard only when one of them changed. Other per-view encodings of image
    shards (latent shards: system/data/latents.py) subclass it with their own `FORMAT`."""

    FORMAT: ClassVar[str] = "tokens-v1"  # first part of the fingerprint: the kind of shard and its version

    split: str
    name: str
    source: str = ""  # URL of the input image shard ("" when written from arrays)
    source_id: str = ""  # the input's content id (its marker's sha256, else name/size/count)
    count: int = 0  # input samples it encodes: [start, start + count) in the input's tar order
    start: int = 0
    tokenizer: str = ""  # the encoder's fingerprint (the tokenizer's; the VAE's for latent shards)
    augment: str = "none"
    resolution: int = 0  # the pixel size images are encoded at (0: not from images)
    folder: Optional[str] = None  # under the output URL; None: the split name

    def split_url(self, out_url: str) -> str:
        return join(out_url, self.split if self.folder is None else self.folder)

    def fingerprint(self) -> str:
        text = (f"{self.FORMAT}|{self.name}|{self.source_id}|{self.start}+{self.count}|{self.tokenizer}|{self.augment}|"
                f"{self.resolution}")
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def done(self, out_url: str, storage: StorageConfig | None = None) -> dict | None:
        """This shard's marker when it is complete for this plan, else None."""
        return done_marker(self.split_url(out_url), self.name, self.fingerprint(), storage)


TokenSample = tuple[str, np.ndarray, int, int]  # (source key, codes (L,), label, aug)


def write_view_shard(plan: TokenShardPlan, out_url: str, samples: Iterable[tuple[str, int, dict[str, bytes]]],
                     storage: StorageConfig | None = None, stats: dict | None = None) -> dict:
    """Write one shard of per-view samples (tar, then its marker) from (source key, aug, tar
    members) triples, each keyed `token_key(source key, aug)`; returns the marker (with `stats`,
    which may be filled while `samples` is consumed). ValueError on a repeated (key, aug) or an
    aug outside the plan's augmentation."""
    views = check_augment(plan.augment)
    seen: set[str] = set()

    def members() -> Iterator[tuple[str, dict[str, bytes]]]:
        for src_key, aug, fields in samples:
            key = token_key(src_key, aug)
            if key in seen:
                raise ValueError(f"shard {plan.name}: sample {key!r} written twice")
            if not 0 <= aug < views:
                raise ValueError(f"shard {plan.name}: aug {aug} outside [0, {views}) for augment {plan.augment!r}")
            seen.add(key)
            yield key, fields

    return write_tar(plan.split_url(out_url), plan.name, plan.fingerprint(), members(), storage, stats)


def write_token_shard(plan: TokenShardPlan, out_url: str, samples: Iterable[TokenSample], vocab_size: int,
                      storage: StorageConfig | None = None, stats: dict | None = None) -> dict:
    """Write one token shard (tar, then its marker) from (source key, codes, label, aug) samples;
    returns the marker (with `stats`, which may be filled while `samples` is consumed). ValueError
    on a repeated (key, aug) or codes >= vocab_size."""
    dtype = token_dtype(vocab_size)
    stats = stats if stats is not None else {}
    stats.update(views=check_augment(plan.augment), seq_len=0)

    def members() -> Iterator[tuple[str, int, dict[str, bytes]]]:
        for src_key, codes, label, aug in samples:
            codes = np.asarray(codes)
            if codes.size and codes.max() >= vocab_size:
                raise ValueError(f"token shard {plan.name}: code {int(codes.max())} >= vocab_size {vocab_size}")
            stats["seq_len"] = int(codes.shape[-1])
            yield src_key, aug, encode_token_sample(codes, label, aug, dtype)

    return write_view_shard(plan, out_url, members(), storage, stats)


def write_token_index(plans: list[TokenShardPlan], out_url: str, classes: dict[str, int], meta: dict[str, Any],
                      storage: StorageConfig | None = None) -> dict:
    """`index.json` (written last) listing the complete token shards, with the `tokens` section."""
    return write_index(plans, out_url, classes, storage, extra={"tokens": meta})


def write_token_set(url: str, codes: np.ndarray, labels: np.ndarray, vocab_size: int, num_shards: int = 2,
                    storage: StorageConfig | None = None, augment: str = "none",
                    classes: Optional[dict[str, int]] = None, tokenizer: Optional[dict] = None) -> dict:
    """A complete token shard set at `url` (the folder that gets index.json) from arrays: codes
    (N, L) integers < vocab_size, labels (N,). Row i is view `i % V` of source sample `i // V`
    (V: views of `augment`), keyed `s<source:06d>_a<view>`. Returns the index (for tests, tools)."""
    codes, labels = np.asarray(codes), np.asarray(labels)
    views = check_augment(augment)
    if codes.ndim != 2 or labels.shape != (codes.shape[0],):
        raise ValueError(f"need codes (N, L) and labels (N,); got {codes.shape} and {labels.shape}")
    if codes.shape[0] % views:
        raise ValueError(f"{codes.shape[0]} rows are not whole images of {views} views ({augment!r})")
    if not 1 <= num_shards <= codes.shape[0] // views:
        raise ValueError(f"num_shards must be in [1, {codes.shape[0] // views}], got {num_shards}")
    if classes is None:
        classes = {f"c{c:04d}": c for c in range(int(labels.max(initial=0)) + 1)}
    images = codes.shape[0] // views
    bounds = [round(images * i / num_shards) for i in range(num_shards + 1)]
    plans = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        plan = TokenShardPlan("train", shard_name("train", i), source_id=f"arrays:{a}:{b}", count=b - a,
                              augment=augment, folder="")
        rows = range(a * views, b * views)
        write_token_shard(plan, url, ((f"s{r // views:06d}", codes[r], int(labels[r]), r % views) for r in rows),
                          vocab_size, storage)
        plans.append(plan)
    meta = token_section(vocab_size, codes.shape[1], augment, tokenizer or {"kind": "arrays", "url": "", "fingerprint": ""})
    return write_token_index(plans, url, classes, meta, storage)
