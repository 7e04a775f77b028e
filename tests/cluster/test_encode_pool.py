"""cluster/encode_pool.py with the latent cache's encoding (system/pipelines/encode.py): config errors
name the key before Ray starts and write nothing; end to end on a local Ray with one CPU actor (the
index written last, a re-run writes nothing, a training reader gets image + latents)."""
from __future__ import annotations

import dataclasses

import pytest
import ray
import torch
from ar_fixtures import write_image_shards, write_tokens

from cluster.encode_pool import run_encoding
from system.config import ClusterConfig, ConfigError, DataConfig, LatentCacheConfig, LatentVAEConfig
from system.data import ShardReader, read_index
from system.encode.pretokenize import latent_vae
from system.pipelines.encode import LatentEncoding


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_shards(str(tmp_path_factory.mktemp("latimg")), 8)  # 8 JPEGs (20x20) in 2 shards


def config(src_url: str, out: str, **kw) -> LatentCacheConfig:
    base = dict(src=src_url, out=out, resolution=16, batch_size=4, num_actors=1,
                vae=LatentVAEConfig(random_init=True, tiny=True),
                cluster=ClusterConfig(local_num_cpus=2, device="cpu", cpus_per_worker=1, max_failures=1))
    return LatentCacheConfig(**{**base, **kw})


@pytest.mark.parametrize("change,key", [
    (dict(out="{src}"), "'out'"),
    (dict(src="/no/such/shards"), "'src'"),
    (dict(src="{tokens}"), "'src'"),
    (dict(augment="ten-crop"), "'augment'"),
    (dict(resolution=20), "'resolution'"),
    (dict(vae=LatentVAEConfig()), "'vae'"),
    (dict(vae=LatentVAEConfig(path="/no/such/vae")), "'vae'"),
    (dict(vae=LatentVAEConfig(random_init=True, tiny=True, sample=True)), "'vae.sample'"),
])
def test_config_errors_name_the_key(images, tmp_path, change, key):
    tokens = write_tokens(str(tmp_path / "tokens"))
    change = {k: v.format(src=images, tokens=tokens) if isinstance(v, str) else v for k, v in change.items()}
    with pytest.raises(ConfigError, match=key):
        LatentEncoding(config(**{"src_url": images, "out": str(tmp_path / "out"), **change})).prepare()
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


@pytest.mark.slow  # starts a local Ray: ~11 s on an idle 2-core machine
def test_end_to_end_on_local_ray_then_rerun(images, tmp_path):
    out = str(tmp_path / "latents")
    cfg = config(images, out)
    try:
        enc = LatentEncoding(cfg).prepare()
        r = run_encoding(enc, progress=False)
        s = {**enc.summary(r), "written": r["written"]}
        assert (s["views"], s["images"], s["written"], s["skipped"], s["out"]) == (16, 8, 2, 0, out)
        assert s["bytes"] > 0 and s["bytes_per_view"] == round(s["bytes"] / 16)
        idx = read_index(out)
        assert idx == r["index"] and idx["latents"]["vae"]["fingerprint"] == latent_vae(cfg.vae)[1]["fingerprint"]
        assert dict(enc.rows(r))["train on it"] == f"data.url={out} data.resolution=16"
        again = run_encoding(LatentEncoding(cfg).prepare(), progress=False)  # every marker matches: nothing is encoded again
        assert again["written"] == 0 and read_index(out) == idx
    finally:
        ray.shutdown()
    data = dataclasses.replace(DataConfig(), url=out, resolution=16, batch_size=4, num_workers=0)
    r = ShardReader.from_config(data, rank=0, world_size=1, seed=0)
    b = next(iter(r))
    assert b["image"].shape == (4, 3, 16, 16) and b["latents"].shape == (4, 16, 2, 2)
    assert b["latents"].dtype == torch.float32 and b["label"].shape == (4,)
    with pytest.raises(ValueError, match="data.resolution"):
        ShardReader.from_config(dataclasses.replace(data, resolution=32), rank=0, world_size=1, seed=0)
