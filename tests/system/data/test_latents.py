"""The latent cache without Ray: latent shards hold each view's exact pixels and the VAE's encoding
of them; `ShardReader` picks the latent codec from the index (image + latents per sample, every
(key, view) once per epoch over ranks and workers); markers make re-runs skip and a changed VAE
rewrite; errors name what is wrong."""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from shardset import build

from system.config import LatentVAEConfig
from system.data import ShardReader, read_index
from system.data.latents import (
    LatentShardPlan,
    check_latent_augment,
    decode_latent_sample,
    latent_meta,
    latent_section,
    write_latent_index,
)
from system.data.shards import iter_tar_samples
from system.data.tokens import TokenShardPlan
from system.data.transforms import augment_views, to_tensor
from system.encode.pretokenize import ShardLatentEncoder, latent_vae, plan_token_shards

R = 16  # views of R x R px -> latents 16 x 2 x 2 (tiny VAE, f = 8)
TINY = LatentVAEConfig(random_init=True, tiny=True)
F16 = dict(rtol=2e-3, atol=2e-3)  # float16 storage


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return build(tmp_path_factory.mktemp("latsrc"), [5, 4])  # 9 JPEGs (20x24) in 2 shards


@pytest.fixture(scope="module")
def tiny():
    return latent_vae(TINY)  # (vae, info); every build of TINY has these weights


@pytest.fixture(scope="module")
def cache(src, tiny, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("latcache"))
    plans, markers = cache_set(src[0], TINY, tiny[1], out)
    return out, plans, markers


def cache_set(src_url, cfg, info, out, augment="flip", batch_size=3):
    """What cluster/latent_pool.py does, in process: plan, encode every shard, write the index."""
    index, plans = plan_token_shards(src_url, info, augment, R, plan_cls=LatentShardPlan)
    w = ShardLatentEncoder(cfg, out, augment=augment, resolution=R, batch_size=batch_size)
    markers = [w(p) for p in plans]
    write_latent_index(plans, out, index["classes"], latent_section(w.channels, w.size, R, augment, w.info))
    return plans, markers


def source_images(src_url) -> dict[str, bytes]:
    out = {}
    for s in read_index(src_url)["shards"]:
        with open(os.path.join(src_url, s["name"]), "rb") as f:
            out.update({k: fields["jpg"] for k, fields in iter_tar_samples(f)})
    return out


def test_latents_are_the_vaes_encoding_of_each_view(src, tiny, cache):
    (src_url, keys), (vae, info), (out, plans, markers) = src, tiny, cache
    assert [m["count"] for m in markers] == [10, 8] and all(m["views"] == 2 and m["skipped"] == 0 for m in markers)
    idx = read_index(out)
    meta = latent_meta(idx)
    assert (meta["channels"], meta["size"], meta["dtype"], meta["resolution"], meta["augment"]) == (16, 2, "float16", R, "flip")
    assert meta["vae"]["fingerprint"] == info["fingerprint"] == vae.fingerprint() and meta["vae"]["source"] == {
        "random_init": True, "tiny": True} and meta["vae"]["config"]["latent_channels"] == 16
    assert idx["num_samples"] == 18 and idx["classes"] == read_index(src_url)["classes"]
    images = source_images(src_url)
    got = {}
    for p in plans:
        with open(os.path.join(out, p.name), "rb") as f:
            for key, fields in iter_tar_samples(f):
                assert sorted(fields) == ["aug", "cls", "lat", "png"]
                got[key] = decode_latent_sample(fields, 16, 2, R)
    assert sorted(got) == sorted(f"{k}_a{a}" for k in keys for a in (0, 1))
    for key in keys:
        views = augment_views(images[key], R, "flip")  # the centre crop and its mirror
        want = vae.encode(to_tensor(views))
        for aug in (0, 1):
            pixels, lat, label, a = got[f"{key}_a{aug}"]
            assert a == aug and label == int(key[1:]) % 5 and lat.dtype == np.float16
            assert np.array_equal(pixels, views[aug])
            torch.testing.assert_close(torch.from_numpy(lat.astype(np.float32)), want[aug], **F16)
    assert not np.array_equal(got[f"{keys[0]}_a0"][1], got[f"{keys[0]}_a1"][1])


def test_reader_batches_hold_the_view_and_its_latents(cache, tiny, caplog):
    out, vae = cache[0], tiny[0]
    r = ShardReader(out, resolution=R, batch_size=4, seed=1, random_flip=True, drop_last=False)  # random_flip: not applied
    assert r.latent_meta["channels"] == 16 and r.num_classes == 5
    n = 0
    for b in r.one_epoch():
        assert sorted(b) == ["image", "key", "label", "latents"]
        assert b["image"].dtype == torch.float32 and b["image"].shape[1:] == (3, R, R)
        assert b["latents"].dtype == torch.float32 and b["latents"].shape == (len(b["key"]), 16, 2, 2)
        assert b["image"].min() >= -1 and b["image"].max() <= 1
        torch.testing.assert_close(b["latents"], vae.encode(b["image"]), **F16)  # the image is the encoded view
        n += len(b["key"])
    assert n == 18


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_key_and_view_once_over_two_ranks_with_resume(cache, num_workers):
    out = cache[0]
    seen = []
    kw = dict(resolution=R, world_size=2, batch_size=2, seed=5, num_workers=num_workers, drop_last=False, chunk_size=4)
    for rank in range(2):
        first = ShardReader(out, rank=rank, **kw)
        it = first.one_epoch()
        seen += [k for _, b in zip(range(2), it) for k in b["key"]]
        again = ShardReader(out, rank=rank, **kw)
        again.load_state_dict(first.state_dict())
        seen += [k for b in again.one_epoch() for k in b["key"]]
    counts = Counter(seen)
    assert len(counts) == 18 and set(counts.values()) == {1}


def test_rerun_skips_and_a_changed_vae_rewrites(src, tiny, tmp_path):
    from system.models.vae import new_autoencoder

    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        new_autoencoder(tiny=True).save_pretrained(str(tmp_path / f"vae{seed}"))
        folders.append(LatentVAEConfig(path=str(tmp_path / f"vae{seed}")))
    infos = [latent_vae(c)[1] for c in folders]
    assert infos[0]["fingerprint"] != infos[1]["fingerprint"] and infos[0]["source"] == {"path": folders[0].path}
    out = str(tmp_path / "out")
    plans, markers = cache_set(src[0], folders[0], infos[0], out, augment="none")
    stamps = {p.name: os.stat(os.path.join(out, p.name)).st_mtime_ns for p in plans}
    assert [m["count"] for m in markers] == [5, 4]
    _, again = cache_set(src[0], folders[0], infos[0], out, augment="none")  # the markers match: nothing written
    assert again == markers and all(os.stat(os.path.join(out, n)).st_mtime_ns == t for n, t in stamps.items())
    first = {k: z for b in ShardReader(out, resolution=R, batch_size=3, drop_last=False).one_epoch()
             for k, z in zip(b["key"], b["latents"])}
    new_plans, new_markers = cache_set(src[0], folders[1], infos[1], out, augment="none")  # other weights: rewritten
    assert all(m["fingerprint"] != o["fingerprint"] for m, o in zip(new_markers, markers))
    assert all(os.stat(os.path.join(out, n)).st_mtime_ns != t for n, t in stamps.items())
    r = ShardReader(out, resolution=R, batch_size=3, drop_last=False)
    assert r.latent_meta["vae"]["fingerprint"] == infos[1]["fingerprint"]
    second = {k: z for b in r.one_epoch() for k, z in zip(b["key"], b["latents"])}
    assert sorted(second) == sorted(first) and not any(torch.allclose(first[k], second[k]) for k in first)
    w = ShardLatentEncoder(folders[0], str(tmp_path / "other"), augment="none", resolution=R)
    with pytest.raises(ValueError, match="planned for VAE"):  # a worker whose VAE is not the planned one
        w(new_plans[0])
    # the fingerprint also covers the augmentation, resolution and kind of shard
    fps = {plan_token_shards(src[0], infos[0], a, res, plan_cls=cls)[1][0].fingerprint()
           for a in ("none", "flip") for res in (R, 32) for cls in (LatentShardPlan, TokenShardPlan)}
    assert len(fps) == 8


def test_errors_name_what_is_wrong(src, cache, tmp_path):
    out = cache[0]
    with pytest.raises(ValueError, match=r"data.resolution = 32.*16 px.*data.resolution=16"):
        ShardReader(out, resolution=32, batch_size=2)
    with pytest.raises(ValueError, match="ten-crop.*not supported.*none, flip"):
        check_latent_augment("ten-crop")
    with pytest.raises(ValueError, match="ten-crop.*not supported"):
        ShardLatentEncoder(TINY, str(tmp_path / "x"), augment="ten-crop", resolution=R)
    with pytest.raises(ValueError, match="resolution 12 is not a positive multiple of the VAE's downsampling factor 8"):
        ShardLatentEncoder(TINY, str(tmp_path / "x"), augment="none", resolution=12)
    with pytest.raises(ValueError, match="not a latent-shard index.*latent_pool"):
        latent_meta(read_index(src[0]), "src")
    # a corrupt latent sample is skipped and counted like any unreadable sample
    name = read_index(out)["shards"][0]["name"]
    with tarfile.open(os.path.join(out, name)) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    bad = str(tmp_path / "bad")
    os.makedirs(bad)
    with tarfile.open(os.path.join(bad, name), "w", format=tarfile.USTAR_FORMAT) as t:
        for m, data in members:
            if m.name.endswith(".lat") and m.name.startswith(members[0][0].name.split(".")[0]):
                data = data[:-2]  # one value short
            m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    idx = read_index(out)
    idx["shards"] = idx["shards"][:1]
    idx["num_samples"] = idx["shards"][0]["count"]
    with open(os.path.join(bad, "index.json"), "w") as f:
        json.dump(idx, f)
    r = ShardReader(bad, resolution=R, batch_size=3, drop_last=False)
    keys = [k for b in r.one_epoch() for k in b["key"]]
    assert len(keys) == idx["num_samples"] - 1 and r.skipped == 1
