"""The latent cache (a SemTok pipeline step, config `LatentCacheConfig`): check the inputs, then
encode every view of the unfinished image shards with the frozen VAE on a Ray map pool
(`cluster.pretokenize_pool.encode_shards`: GPU actors when cluster.device says so) and write the
latent index last (its existence = done). Format: system/data/latents.py; per-shard work:
system/encode/pretokenize.py `ShardLatentEncoder`. A training run whose data.url is `out` (and
data.resolution the cache's) gets batches with "image" and its cached "latents".

Resumable as pre-tokenization: shards whose marker fingerprint matches (same input, VAE weights and
config, augment, resolution) are skipped; the others are rewritten."""
from __future__ import annotations

import functools
from typing import Optional

from system.config import ConfigError, LatentCacheConfig


def prepare(cfg: LatentCacheConfig) -> tuple[dict, dict]:
    """(source index, latents section of the index to write), or a ConfigError naming the bad key.
    Builds the VAE once (on the CPU) to fingerprint it."""
    from system.data.latents import LATENT_AUGMENTS, latent_section
    from system.data.shards import check_shard_set
    from system.encode.pretokenize import latent_shape, latent_vae

    index = check_shard_set(cfg.src, "src", cfg.storage)
    kind = next((k for k in ("tokens", "latents") if k in index), None)
    if kind:
        raise ConfigError(f"config key 'src' = {cfg.src!r} holds {'token' if kind == 'tokens' else 'latent'} shards; "
                          "point it at image shards")
    if cfg.out.rstrip("/") == cfg.src.rstrip("/"):
        raise ConfigError(f"config key 'out' = {cfg.out!r} is the source folder; write the latent shards elsewhere")
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
    return index, latent_section(channels, size, cfg.resolution, cfg.augment, info)


def cache_latents(cfg: LatentCacheConfig, prepared: Optional[tuple[dict, dict]] = None, progress: bool = True) -> dict:
    """Write the latent cache of `cfg` (config checks first: `prepare`, unless its result is given;
    then Ray is joined or started, `init_ray`). Returns a summary: {"views", "images", "bytes",
    "bytes_per_view", "written" (shards encoded now), "restarts", "skipped" (unreadable images),
    "out", "index"}."""
    from cluster.pretokenize_pool import encode_shards
    from cluster.runtime import init_ray
    from system.data.latents import LatentShardPlan, write_latent_index
    from system.encode.pretokenize import ShardLatentEncoder, plan_token_shards

    index, meta = prepared if prepared is not None else prepare(cfg)
    init_ray(cfg.cluster)
    _, plans = plan_token_shards(cfg.src, meta["vae"], cfg.augment, cfg.resolution, cfg.shard_size, cfg.storage,
                                 plan_cls=LatentShardPlan)
    worker = functools.partial(ShardLatentEncoder, cfg.vae, cfg.out, augment=cfg.augment, resolution=cfg.resolution,
                               batch_size=cfg.batch_size, storage=cfg.storage)
    s = encode_shards(cfg, plans, worker, "latent cache",
                      f"augment={cfg.augment}, {meta['channels']}x{meta['size']}x{meta['size']} latents at "
                      f"{cfg.resolution} px, VAE {meta['vae']['fingerprint']}",
                      lambda: write_latent_index(plans, cfg.out, index["classes"], meta, cfg.storage), progress)
    views = s["index"]["num_samples"]
    return {**s, "views": views, "images": index["num_samples"], "bytes_per_view": round(s["bytes"] / max(views, 1)),
            "out": cfg.out}


def summary_rows(cfg: LatentCacheConfig, s: dict) -> list[tuple[str, object]]:
    """The final table's rows of a latent cache (`s`: what `cache_latents` returned)."""
    meta = s["index"]["latents"]
    return [("latent samples (views)", s["views"]), ("source images", s["images"]), ("skipped images", s["skipped"]),
            ("shards written now", s["written"]), ("actor restarts", s["restarts"]), ("bytes", s["bytes"]),
            ("bytes per view", s["bytes_per_view"]), ("VAE", meta["vae"]["fingerprint"]),
            ("train on it", f"data.url={cfg.out} data.resolution={cfg.resolution}")]
