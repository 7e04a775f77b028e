"""The pre-tokenization job after its config is read (jobs/pretokenize.py, and the pipelines'
pretokenize step): check the inputs, then encode the unfinished image shards on a Ray map pool
(`cluster.map_pool.run_map_pool`) and write the token index last. `encode_shards` is that pool run
for any per-shard encoder (the latent cache, cluster/latent_pool.py, uses it too)."""
from __future__ import annotations

import functools
from typing import Callable

from system.config import ConfigError, LatentCacheConfig, PretokenizeConfig


def prepare(cfg: PretokenizeConfig) -> tuple[dict, dict, dict]:
    """(source index, tokenizer info, tokens section), or a ConfigError naming the bad key."""
    from system.data.shards import check_shard_set
    from system.data.tokens import token_section
    from system.encode.pretokenize import resolve_resolution, tokenizer_fingerprint
    from system.models.tokenizers import load_tokenizer

    index = check_shard_set(cfg.src, "src", cfg.storage)
    if "tokens" in index:
        raise ConfigError(f"config key 'src' = {cfg.src!r} holds token shards; point it at image shards")
    if cfg.out.rstrip("/") == cfg.src.rstrip("/"):
        raise ConfigError(f"config key 'out' = {cfg.out!r} is the source folder; write token shards elsewhere")
    try:
        info = tokenizer_fingerprint(cfg.export_url, cfg.storage, cfg.part)
        tok = load_tokenizer(cfg.export_url, cfg.storage, part=cfg.part)
    except (FileNotFoundError, KeyError, ValueError, OSError) as e:
        raise ConfigError(f"config key 'export_url' = {cfg.export_url!r}: {e}") from None
    try:
        res = cfg.resolution = resolve_resolution(tok, cfg.resolution)
    except ValueError as e:
        raise ConfigError(f"config key 'resolution' = {cfg.resolution}: {e}") from None
    return index, info, token_section(tok.vocab_size, tok.num_tokens(res), cfg.augment, info)


def pretokenize(cfg: PretokenizeConfig, index: dict, info: dict, meta: dict, progress: bool = True) -> dict:
    """Plan, encode the unfinished shards on the map pool, write the index; returns a summary."""
    from system.data.tokens import write_token_index
    from system.encode.pretokenize import ShardTokenizer, plan_token_shards

    _, plans = plan_token_shards(cfg.src, info, cfg.augment, cfg.resolution, cfg.shard_size, cfg.storage)
    worker = functools.partial(ShardTokenizer, cfg.export_url, cfg.out, augment=cfg.augment, resolution=cfg.resolution,
                               batch_size=cfg.batch_size, part=cfg.part, storage=cfg.storage)
    return encode_shards(cfg, plans, worker, "pretokenize", f"augment={cfg.augment}, {meta['seq_len']} codes at "
                         f"{cfg.resolution} px", lambda: write_token_index(plans, cfg.out, index["classes"], meta,
                                                                            cfg.storage), progress)


def encode_shards(cfg: PretokenizeConfig | LatentCacheConfig, plans: list, worker: Callable[..., Callable], title: str, detail: str,
                  write_index: Callable[[], dict], progress: bool = True) -> dict:
    """Encode the plans whose shard is not complete on a Ray map pool of `worker(device=...)` actors
    (a `ShardEncoder`; GPU actors when cfg.cluster says so), then `write_index()` (last: its
    existence means done, so an index from an earlier run is removed before shards are rewritten).
    `cfg`: a PretokenizeConfig or LatentCacheConfig (out, num_actors, storage, cluster); `title`,
    `detail`: the start line's words. Returns {"index", "written", "restarts", "bytes", "skipped"};
    RuntimeError naming the shards that failed."""
    import ray

    from cluster.console import say
    from cluster.map_pool import run_map_pool
    from cluster.runtime import resolve_use_gpu
    from system.data.shards import INDEX, complete_markers
    from system.data.storage import exists, filesystem, join

    todo = [p for p in plans if p.name not in complete_markers(plans, cfg.out, cfg.storage)]
    gpu = resolve_use_gpu(cfg.cluster)
    have = ray.cluster_resources().get("GPU" if gpu else "CPU", 1)
    actors = cfg.num_actors or max(1, int(have // (cfg.cluster.gpus_per_worker if gpu else cfg.cluster.cpus_per_worker)))
    say(f"{title}: {len(plans)} shards ({len(plans) - len(todo)} done), {min(actors, max(len(todo), 1))} "
        f"{'GPU' if gpu else 'CPU'} actors, {detail}")
    stale = join(plans[0].split_url(cfg.out), INDEX) if plans else ""
    if todo and exists(stale, cfg.storage):  # the set is about to change: until its new index is written it is not done
        fs, path = filesystem(stale, cfg.storage)
        fs.rm(path)
    res = run_map_pool(functools.partial(worker, device="cuda" if gpu else "cpu"), todo, num_actors=actors,
                       num_cpus=cfg.cluster.cpus_per_worker, num_gpus=cfg.cluster.gpus_per_worker if gpu else 0,
                       max_restarts=cfg.cluster.max_failures, name=lambda p: p.source, desc="shards",
                       done_before=len(plans) - len(todo), progress=progress)
    if res.failures:
        bad = "; ".join(f"{todo[i].name}: {msg}" for i, msg in list(res.failures.items())[:5])
        raise RuntimeError(f"{len(res.failures)} shard(s) failed (finished shards are kept; re-run): {bad}")
    out = write_index()
    markers = complete_markers(plans, cfg.out, cfg.storage)
    size = sum(m["bytes"] for m in markers.values())
    return {"index": out, "written": len(todo), "restarts": res.restarts, "bytes": size,
            "skipped": sum(m.get("skipped", 0) for m in markers.values())}


def summary_rows(cfg: PretokenizeConfig, index: dict, info: dict, s: dict) -> list[tuple[str, object]]:
    """The final table's rows of a pre-tokenization (`s`: what `pretokenize` returned)."""
    n = s["index"]["num_samples"]
    return [("token samples (views)", n), ("source images", index["num_samples"]), ("skipped images", s["skipped"]),
            ("shards written now", s["written"]), ("actor restarts", s["restarts"]),
            ("bytes", s["bytes"]), ("bytes per view", round(s["bytes"] / max(n, 1))),
            ("tokenizer", f"{info['kind']} {info['fingerprint']}"), ("train on it", f"data.url={cfg.out}")]
