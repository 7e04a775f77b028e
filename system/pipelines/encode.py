"""Encoding a shard set with a frozen export, one output shard per input shard, its index written
last (its existence means done): pre-tokenization (`TokenEncoding`: a tokenizer export -> token
shards, jobs/pretokenize.py) and the latent cache (`LatentEncoding`: a VAE -> each view's pixels and
latents, SemTok's optional step). cluster/encode_pool.py runs either on a Ray map pool: one encoder
per actor (`worker`), the unfinished shards of `plans` handed out, then `write_index`.

`prepare()` checks the inputs before any resource is taken (ConfigError naming the key) and reads
what the rest needs (the source index, the encoder's fingerprint)."""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from system.config import ConfigError, LatentCacheConfig, PretokenizeConfig


class ShardEncoding:
    """Base: `cfg` holds src, out, storage, cluster, num_actors, batch_size, shard_size, augment."""

    title = "encode"
    samples = "samples"  # what one output sample is called in the table
    cfg: Any

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.index: Optional[dict] = None  # the source index (after prepare)
        self.meta: dict = {}  # the output index's own section (after prepare)

    def prepare(self) -> "ShardEncoding":
        raise NotImplementedError

    def plans(self) -> list:
        """One plan per output shard (fingerprinted: a finished shard with the same inputs is skipped)."""
        raise NotImplementedError

    def worker(self) -> Callable[..., Callable]:
        """A picklable factory: `worker()(device=...)` builds the encoder one actor holds."""
        raise NotImplementedError

    def detail(self) -> str:
        """The start line's words (what is encoded how)."""
        return ""

    def write_index(self, plans: list) -> dict:
        raise NotImplementedError

    def summary(self, s: dict) -> dict:
        """The pipeline step's summary of an encode pool's result `s`."""
        views = s["index"]["num_samples"]
        return {"views": views, "images": self.index["num_samples"], "bytes": s["bytes"],
                "bytes_per_view": round(s["bytes"] / max(views, 1)), "skipped": s["skipped"], "out": self.cfg.out}

    def rows(self, s: dict) -> list[tuple[str, object]]:
        """The final table's rows of an encode pool's result `s`."""
        m = self.summary(s)
        return [(f"{self.samples} (views)", m["views"]), ("source images", m["images"]), ("skipped images", m["skipped"]),
                ("shards written now", s["written"]), ("actor restarts", s["restarts"]), ("bytes", m["bytes"]),
                ("bytes per view", m["bytes_per_view"])]

    def _source_index(self, what: str) -> dict:
        from system.data.shards import check_shard_set

        cfg = self.cfg
        index = check_shard_set(cfg.src, "src", cfg.storage)
        kind = next((k for k in ("tokens", "latents") if k in index), None)
        if kind:
            raise ConfigError(f"config key 'src' = {cfg.src!r} holds {'token' if kind == 'tokens' else 'latent'} shards; "
                              "point it at image shards")
        if cfg.out.rstrip("/") == cfg.src.rstrip("/"):
            raise ConfigError(f"config key 'out' = {cfg.out!r} is the source folder; write {what} elsewhere")
        return index


class TokenEncoding(ShardEncoding):
    """Image shards -> token shards with a tokenizer export (`PretokenizeConfig`)."""

    title = "pretokenize"
    samples = "token samples"
    cfg: PretokenizeConfig

    def prepare(self) -> "TokenEncoding":
        from system.encode.pretokenize import resolve_resolution, tokenizer_fingerprint
        from system.data.tokens import token_section
        from system.models.tokenizers import load_tokenizer

        cfg = self.cfg
        self.index = self._source_index("token shards")
        try:
            self.info = tokenizer_fingerprint(cfg.export_url, cfg.storage, cfg.part)
            tok = load_tokenizer(cfg.export_url, cfg.storage, part=cfg.part)
        except (FileNotFoundError, KeyError, ValueError, OSError) as e:
            raise ConfigError(f"config key 'export_url' = {cfg.export_url!r}: {e}") from None
        try:
            cfg.resolution = resolve_resolution(tok, cfg.resolution)
        except ValueError as e:
            raise ConfigError(f"config key 'resolution' = {cfg.resolution}: {e}") from None
        self.meta = token_section(tok.vocab_size, tok.num_tokens(cfg.resolution), cfg.augment, self.info)
        return self

    def plans(self) -> list:
        from system.encode.pretokenize import plan_token_shards

        c = self.cfg
        return plan_token_shards(c.src, self.info, c.augment, c.resolution, c.shard_size, c.storage)[1]

    def worker(self) -> Callable[..., Callable]:
        from system.encode.pretokenize import ShardTokenizer

        c = self.cfg
        return functools.partial(ShardTokenizer, c.export_url, c.out, augment=c.augment, resolution=c.resolution,
                                 batch_size=c.batch_size, part=c.part, storage=c.storage)

    def detail(self) -> str:
        return f"augment={self.cfg.augment}, {self.meta['seq_len']} codes at {self.cfg.resolution} px"

    def write_index(self, plans: list) -> dict:
        from system.data.tokens import write_token_index

        return write_token_index(plans, self.cfg.out, self.index["classes"], self.meta, self.cfg.storage)

    def rows(self, s: dict) -> list[tuple[str, object]]:
        return super().rows(s) + [("tokenizer", f"{self.info['kind']} {self.info['fingerprint']}"),
                                  ("train on it", f"data.url={self.cfg.out}")]


class LatentEncoding(ShardEncoding):
    """Image shards -> latent shards (each view's pixels and frozen-VAE latents, `LatentCacheConfig`):
    a training run whose data.url is `out` (and data.resolution the cache's) reads the latents
    instead of running the VAE every step. Builds the VAE once (on the CPU) to fingerprint it."""

    title = "latent cache"
    samples = "latent samples"
    cfg: LatentCacheConfig

    def prepare(self) -> "LatentEncoding":
        from system.data.latents import LATENT_AUGMENTS, latent_section
        from system.encode.pretokenize import latent_shape, latent_vae

        cfg = self.cfg
        self.index = self._source_index("the latent shards")
        if cfg.augment not in LATENT_AUGMENTS:
            raise ConfigError(f"config key 'augment' = {cfg.augment!r}: a latent cache supports {', '.join(LATENT_AUGMENTS)} "
                              "(ten-crop views are not the centre crops SemTok trains on)")
        if not isinstance(cfg.resolution, int) or cfg.resolution < 8 or cfg.resolution % 8:
            raise ConfigError(f"config key 'resolution' = {cfg.resolution!r}: set the training's data.resolution, a "
                              "multiple of 8 >= 8 (e.g. resolution=256)")
        if cfg.vae.sample:
            raise ConfigError("config key 'vae.sample' = True: a cache keeps one latent per view, so it caches the "
                              "posterior mean; set vae.sample=false")
        try:
            vae, info = latent_vae(cfg.vae, cfg.storage)
        except (FileNotFoundError, KeyError, ValueError, OSError) as e:
            raise ConfigError(f"config key 'vae': {e}") from None
        try:
            channels, size = latent_shape(vae, cfg.resolution)
        except ValueError as e:
            raise ConfigError(f"config key 'resolution' = {cfg.resolution}: {e}") from None
        self.meta = latent_section(channels, size, cfg.resolution, cfg.augment, info)
        return self

    def plans(self) -> list:
        from system.data.latents import LatentShardPlan
        from system.encode.pretokenize import plan_token_shards

        c = self.cfg
        return plan_token_shards(c.src, self.meta["vae"], c.augment, c.resolution, c.shard_size, c.storage,
                                 plan_cls=LatentShardPlan)[1]

    def worker(self) -> Callable[..., Callable]:
        from system.encode.pretokenize import ShardLatentEncoder

        c = self.cfg
        return functools.partial(ShardLatentEncoder, c.vae, c.out, augment=c.augment, resolution=c.resolution,
                                 batch_size=c.batch_size, storage=c.storage)

    def detail(self) -> str:
        m = self.meta
        return (f"augment={self.cfg.augment}, {m['channels']}x{m['size']}x{m['size']} latents at {self.cfg.resolution} px, "
                f"VAE {m['vae']['fingerprint']}")

    def write_index(self, plans: list) -> dict:
        from system.data.latents import write_latent_index

        return write_latent_index(plans, self.cfg.out, self.index["classes"], self.meta, self.cfg.storage)

    def rows(self, s: dict) -> list[tuple[str, object]]:
        return super().rows(s) + [("VAE", self.meta["vae"]["fingerprint"]),
                                  ("train on it", f"data.url={self.cfg.out} data.resolution={self.cfg.resolution}")]
