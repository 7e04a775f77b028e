"""Encoding a shard set with a frozen model, the per-shard work (no Ray). Pre-tokenization: one image
shard (or a slice of one) -> one token shard of the codes of every augmented view (format:
system/data/tokens.py). cluster/actor_pool.py runs `ShardTokenizer` in actors; jobs/pretokenize.py
plans, runs and writes the index. It sits above system/models (it loads the frozen tokenizer / VAE);
the shard formats it writes stay in system/data.

The latent cache is the same work with SemTok's frozen VAE for the encoder: `ShardLatentEncoder`
writes latent shards (each view's pixels + its latents; format and storage: system/data/latents.py),
run by cluster/latent_pool.py. Both share `ShardEncoder` (read, view, batch, encode, write).

Resumable: a token shard's marker carries a fingerprint of (input shard sha256 from its marker,
sample range, tokenizer weights + config, augment, resolution); a re-run skips shards whose marker
matches and rewrites the others atomically, so each (source key, view) is in the output once.
Unreadable source images are skipped (logged, counted as `skipped` in the marker).

Storage per view (measured, tar headers included): each view is three tar members (.tok, .cls,
.aug), each a 512 B header plus its data padded to 512 B, so a view costs 3072 B while its codes
take <= 512 B (256 codes x uint16 = 512 B, exactly one block; 16 debug codes = 32 B, same 3072 B).
Per source image: none 3 KiB, flip 6 KiB, ten-crop 30 KiB; ImageNet train (1.28 M images):
3.9 GB / 7.9 GB / 39 GB (raw codes: 0.66 / 1.3 / 6.6 GB). Plus ~10 KiB per shard (tar end
blocks and record padding, the marker). Beyond 65536 codes the dtype is int32 (int64 beyond 2^31) (1024 B per 256
codes: the .tok member takes two blocks, 3584 B per view).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
from typing import Any, Iterator, Optional

import numpy as np
import torch

from system.config.methods import LatentVAEConfig
from system.config.sections import StorageConfig
from system.data.latents import check_latent_augment, write_latent_shard
from system.data.shards import IMAGE_FIELDS, MARKER_SUFFIX, iter_tar_samples, read_index
from system.data.storage import filesystem, join, read_bytes, storage_error
from system.data.tokens import TokenShardPlan, check_augment, write_token_shard
from system.models import weights
from system.data.transforms import augment_views, to_tensor
from system.models.artifacts import model_part
from system.models.tokenizers import load_tokenizer
from system.models.vae import LatentVAE, build_latent_vae

log = logging.getLogger(__name__)


def tokenizer_fingerprint(export_url: str, storage: StorageConfig | None = None, part: str = "tokenizer") -> dict:
    """{"kind", "url", "part", "fingerprint"} of an export's tokenizer: a hash of its model.json
    entry and the weights `load_tokenizer` uses (EMA when present)."""
    entry = model_part(export_url, part, storage)
    h = hashlib.sha256(json.dumps(entry, sort_keys=True).encode())
    if not weights.need(f"tokenizer {part!r} of an export (fingerprint)", export_url):  # plan mode: its config only
        return {"kind": entry["kind"], "url": export_url, "part": part, "fingerprint": "planned-" + h.hexdigest()[:8]}
    for name in (f"{part}_ema.safetensors", f"{part}.safetensors"):
        try:
            h.update(read_bytes(join(export_url, name), storage))
            break
        except FileNotFoundError:
            continue
    else:
        raise FileNotFoundError(f"no {part}_ema.safetensors or {part}.safetensors under {export_url}")
    return {"kind": entry["kind"], "url": export_url, "part": part, "fingerprint": h.hexdigest()[:16]}


def source_ids(src_url: str, index: dict, storage: StorageConfig | None = None) -> dict[str, str]:
    """{shard name: content id} of an image shard set: its marker's sha256 (one batched read),
    else name + size for a shard without a marker."""
    fs, root = filesystem(src_url, storage)
    names = [s["name"] for s in index["shards"]]
    try:
        blobs = fs.cat([join(root, n + MARKER_SUFFIX) for n in names], on_error="omit")
    except Exception as e:  # noqa: BLE001
        raise storage_error(src_url, storage, e) from e
    by_name = {k.rstrip("/").rsplit("/", 1)[-1][: -len(MARKER_SUFFIX)]: json.loads(v) for k, v in blobs.items()}
    out = {}
    for n in names:
        sha = by_name.get(n, {}).get("sha256")
        out[n] = f"sha256:{sha}" if sha else f"size:{n}:{fs.size(join(root, n))}"
    return out


def plan_token_shards(src_url: str, tokenizer: dict, augment: str, resolution: int, shard_size: int = 0,
                      storage: StorageConfig | None = None,
                      plan_cls: type[TokenShardPlan] = TokenShardPlan) -> tuple[dict, list[TokenShardPlan]]:
    """(source index, plans): one token shard per image shard, or per `shard_size` of its images.
    Token shards are written into the output folder itself (it gets index.json). `tokenizer`: the
    encoder's info ({"fingerprint", ...}); `plan_cls`: LatentShardPlan plans latent shards."""
    check_augment(augment)
    index = read_index(src_url, storage)
    ids = source_ids(src_url, index, storage)
    plans = []
    for s in index["shards"]:
        count = int(s["count"])
        size = shard_size or max(count, 1)
        parts = math.ceil(count / size)
        stem = s["name"][: -len(".tar")] if s["name"].endswith(".tar") else s["name"]
        for k, start in enumerate(range(0, count, size)):
            name = s["name"] if parts == 1 else f"{stem}-p{k:03d}.tar"
            plans.append(plan_cls(index.get("split", "train"), name, source=join(src_url, s["name"]),
                                  source_id=ids[s["name"]], count=min(size, count - start), start=start,
                                  tokenizer=tokenizer["fingerprint"], augment=augment, resolution=resolution, folder=""))
    return index, plans


EncodedView = tuple[str, int, int, np.ndarray, np.ndarray]  # (source key, label, view id, pixels (R,R,3), encoding)


class ShardEncoder:
    """The per-shard work of an encoder over image shards (base of `ShardTokenizer` and
    `ShardLatentEncoder`): called per plan, it reads the plan's slice of its input shard, makes every
    view of every readable image, runs `encode` on batches of `batch_size` views and hands the
    results to `write` (which writes the output shard, then its marker). Returns the shard's marker
    (an existing matching marker is returned as is)."""

    def __init__(self, out_url: str, *, augment: str, resolution: int, batch_size: int, device: str,
                 storage: StorageConfig | None):
        self.out_url, self.augment, self.resolution = out_url, augment, resolution
        self.batch_size, self.storage, self.device = batch_size, storage, torch.device(device)
        self.views = check_augment(augment)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [-1, 1] on `device` -> (B, ...) encodings."""
        raise NotImplementedError

    def write(self, plan: TokenShardPlan, views: Iterator[EncodedView], stats: dict) -> dict:
        """Write `plan`'s shard from its encoded views (in order); returns the marker."""
        raise NotImplementedError

    def __call__(self, plan: TokenShardPlan) -> dict:
        done = plan.done(self.out_url, self.storage)
        if done is not None:
            return done
        stats: dict[str, Any] = {"skipped": 0}
        samples = self._source_samples(plan, stats)
        return self.write(plan, self._encode(samples, stats), stats)

    def _source_samples(self, plan: TokenShardPlan, stats: dict) -> list[tuple[str, dict]]:
        """The plan's slice of its input shard, checked against the content id it was planned with."""
        data = read_bytes(plan.source, self.storage)
        if plan.source_id.startswith("sha256:") and hashlib.sha256(data).hexdigest() != plan.source_id[7:]:
            raise ValueError(f"{plan.source} changed since it was planned (sha256 differs from its marker); re-run")
        out, n = [], 0
        for key, fields in iter_tar_samples(io.BytesIO(data), plan.source):
            if fields is None:
                stats["skipped"] += 1
                break
            if plan.start <= n < plan.start + plan.count:
                out.append((key, fields))
            n += 1
        return out

    def _encode(self, samples: list[tuple[str, dict]], stats: dict) -> Iterator[EncodedView]:
        """Every view of every readable sample, in order, with its encoding."""
        pending: list[tuple[str, int, np.ndarray]] = []
        for key, fields in samples:
            img = next((fields[f] for f in IMAGE_FIELDS if f in fields), None)
            try:
                if img is None or "cls" not in fields:
                    raise ValueError(f"incomplete sample (fields: {sorted(fields)})")
                pending.append((key, int(fields["cls"]), augment_views(img, self.resolution, self.augment)))
            except Exception as e:  # noqa: BLE001 - an unreadable image is skipped and counted
                log.warning("skipping source sample %r: %s: %s", key, type(e).__name__, e)
                stats["skipped"] += 1
                continue
            if len(pending) * self.views >= self.batch_size:
                yield from self._flush(pending)
                pending = []
        yield from self._flush(pending)

    def _flush(self, pending: list[tuple[str, int, np.ndarray]]) -> Iterator[EncodedView]:
        if not pending:
            return
        views = np.concatenate([v for _, _, v in pending])
        out = torch.cat([self.encode(to_tensor(views[i : i + self.batch_size]).to(self.device)).cpu()
                         for i in range(0, len(views), self.batch_size)]).numpy()
        for j, (key, label, _) in enumerate(pending):
            for aug in range(self.views):
                yield key, label, aug, views[j * self.views + aug], out[j * self.views + aug]


class ShardTokenizer(ShardEncoder):
    """Encodes token shards: built once (tokenizer loaded on `device`), then called per plan;
    returns the shard's marker (an existing matching marker is returned as is)."""

    def __init__(self, export_url: str, out_url: str, *, augment: str, resolution: int, batch_size: int = 64,
                 device: str = "cpu", part: str = "tokenizer", storage: StorageConfig | None = None):
        super().__init__(out_url, augment=augment, resolution=resolution, batch_size=batch_size, device=device,
                         storage=storage)
        self.tokenizer = load_tokenizer(export_url, storage, device=self.device, part=part)
        self.seq_len = self.tokenizer.num_tokens(resolution)  # ValueError: resolution does not fit
        self.vocab_size = int(self.tokenizer.vocab_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode(images)

    def write(self, plan: TokenShardPlan, views: Iterator[EncodedView], stats: dict) -> dict:
        samples = ((key, codes, label, aug) for key, label, aug, _, codes in views)
        return write_token_shard(plan, self.out_url, samples, self.vocab_size, self.storage, stats)


def latent_vae(cfg: LatentVAEConfig, storage: StorageConfig | None = None) -> tuple[LatentVAE, dict]:
    """(the frozen `LatentVAE` of `cfg` on the CPU, its info {"fingerprint", "config", "source"}) for
    a latent cache. `random_init` weights are drawn from seed 0, so every actor builds the same VAE."""
    if cfg.random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            vae = build_latent_vae(cfg, storage)
    else:
        vae = build_latent_vae(cfg, storage)
    source = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) not in (None, False)}
    return vae, {"fingerprint": vae.fingerprint(), "config": vae.config_dict(), "source": source}


def latent_shape(vae: Any, resolution: int) -> tuple[int, int]:
    """(channels, size) of the latents of a resolution x resolution view; ValueError naming what fits."""
    f = vae.downsample
    if resolution < f or resolution % f:
        raise ValueError(f"resolution {resolution} is not a positive multiple of the VAE's downsampling factor {f} "
                         f"(e.g. {max(f, resolution // f * f)})")
    return vae.latent_channels, resolution // f


class ShardLatentEncoder(ShardEncoder):
    """Encodes latent shards (system/data/latents.py): built once (the frozen VAE of `vae` on
    `device`), then called per plan; returns the shard's marker (an existing matching one as is).
    Refuses a plan made for another VAE (its fingerprint differs from this worker's)."""

    def __init__(self, vae: LatentVAEConfig, out_url: str, *, augment: str, resolution: int, batch_size: int = 64,
                 device: str = "cpu", storage: StorageConfig | None = None):
        check_latent_augment(augment)
        super().__init__(out_url, augment=augment, resolution=resolution, batch_size=batch_size, device=device,
                         storage=storage)
        self.vae, self.info = latent_vae(vae, storage)
        self.channels, self.size = latent_shape(self.vae, resolution)
        self.vae.to(self.device)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images)

    def write(self, plan: TokenShardPlan, views: Iterator[EncodedView], stats: dict) -> dict:
        samples = ((key, pixels, lat, label, aug) for key, label, aug, pixels, lat in views)
        return write_latent_shard(plan, self.out_url, samples, self.storage, stats)

    def __call__(self, plan: TokenShardPlan) -> dict:
        if plan.tokenizer != self.info["fingerprint"]:
            raise ValueError(f"{plan.name} was planned for VAE {plan.tokenizer} but this worker built VAE "
                             f"{self.info['fingerprint']} (its weights changed since planning?); re-run")
        return super().__call__(plan)


def resolve_resolution(tokenizer, resolution: Optional[int]) -> int:
    """`resolution`, or the tokenizer's own image size; ValueError when neither fits."""
    if resolution is None:
        if tokenizer.image_size is None:
            raise ValueError(f"this {type(tokenizer).kind} tokenizer encodes any multiple of its downsampling factor; "
                             "set resolution (e.g. resolution=256)")
        resolution = int(tokenizer.image_size)
    tokenizer.num_tokens(resolution)  # ValueError naming what would fit
    return resolution

