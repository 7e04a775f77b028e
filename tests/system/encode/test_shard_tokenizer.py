"""Pre-tokenization's per-shard work without Ray: every (image, view) once, codes equal to a direct
encode, markers that make re-runs skip, fingerprints that notice a changed input or tokenizer."""
from __future__ import annotations

import os
import tarfile

import pytest
import torch

from system.data import TokenShardReader
from system.data.embedded import ensure_embedded_dataset
from system.data.shards import plan_shards, read_index, write_index, write_shard
from system.data.tokens import AUGMENTATIONS, token_section, write_token_index
from system.data.transforms import augment_views, to_tensor
from system.encode.pretokenize import ShardTokenizer, plan_token_shards, resolve_resolution, tokenizer_fingerprint
from system.models.artifacts import Artifact, save_export
from system.models.tokenizer1d import Tokenizer1D, tokenizer_config
from system.models.tokenizers import load_tokenizer


def export(folder, seed=0) -> str:
    torch.manual_seed(seed)
    return save_export(str(folder), {"tokenizer": Artifact.of("tokenizer1d", Tokenizer1D(tokenizer_config("debug-tiny")))})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretok")
    src = ensure_embedded_dataset(str(root / "src"), split="val", per_class=2, resolution=40)  # 16 photos, 2 shards
    return src, export(root / "export")


def run_all(src, exp, out, augment="flip", shard_size=0, batch_size=5):
    info = tokenizer_fingerprint(exp)
    index, plans = plan_token_shards(src, info, augment, 32, shard_size)
    w = ShardTokenizer(exp, out, augment=augment, resolution=32, batch_size=batch_size)
    markers = [w(p) for p in plans]
    write_token_index(plans, out, index["classes"], token_section(w.vocab_size, w.seq_len, augment, info))
    return plans, markers


def test_every_view_once_with_the_tokenizers_codes(setup, tmp_path):
    src, exp = setup
    assert {m: len(augment_views(_first_image(src), 32, m)) for m in AUGMENTATIONS} == AUGMENTATIONS
    plans, markers = run_all(src, exp, str(tmp_path))
    assert [m["count"] for m in markers] == [16, 16] and all(m["skipped"] == 0 and m["views"] == 2 for m in markers)
    r = TokenShardReader(str(tmp_path), batch_size=7, drop_last=False)
    assert r.meta["tokenizer"]["fingerprint"] == plans[0].tokenizer and r.seq_len == 16
    got = {k: c for b in r.one_epoch() for k, c in zip(b["key"], b["codes"])}
    src_keys = [k for s in read_index(src)["shards"] for k in _keys(os.path.join(src, s["name"]))]
    assert sorted(got) == sorted(f"{k}_a{a}" for k in src_keys for a in (0, 1))
    tok = load_tokenizer(exp)
    key, img = src_keys[3], _image(src, src_keys[3])
    want = tok.encode(to_tensor(augment_views(img, 32, "flip")))
    assert torch.equal(got[f"{key}_a0"], want[0]) and torch.equal(got[f"{key}_a1"], want[1])


def test_rerun_skips_and_fingerprints_notice_changes(setup, tmp_path):
    src, exp = setup
    out = str(tmp_path / "out")
    plans, markers = run_all(src, exp, out, augment="none")
    stamps = {p.name: os.stat(os.path.join(out, p.name)).st_mtime_ns for p in plans}
    _, again = run_all(src, exp, out, augment="none")
    assert again == markers and all(os.stat(os.path.join(out, n)).st_mtime_ns == t for n, t in stamps.items())
    info = tokenizer_fingerprint(exp)
    other = tokenizer_fingerprint(export(tmp_path / "other", seed=1))
    assert other["fingerprint"] != info["fingerprint"] and other["kind"] == "tokenizer1d"
    fps = {plan_token_shards(src, i, a, 32)[1][0].fingerprint() for i in (info, other) for a in ("none", "flip")}
    assert len(fps) == 4
    os.remove(os.path.join(out, plans[1].name + ".done.json"))  # that shard's writer "died" before its marker
    _, third = run_all(src, exp, out, augment="none")
    assert third == markers and os.stat(os.path.join(out, plans[0].name)).st_mtime_ns == stamps[plans[0].name]


def test_slices_corrupt_images_and_changed_inputs(setup, tmp_path):
    src, exp = setup
    plans, markers = run_all(src, exp, str(tmp_path / "sliced"), augment="none", shard_size=5)
    assert [(p.start, p.count) for p in plans] == [(0, 5), (5, 3)] * 2 and sum(m["count"] for m in markers) == 16
    assert plans[1].name == "val-000000-p001.tar"
    items = [(b"not a jpeg" if i == 2 else _image(src, k), k, 0) for i, k in enumerate(_keys(os.path.join(src, "val-000000.tar"))[:4])]
    bad_src = str(tmp_path / "bad")
    ps = plan_shards(items, "val", 4, folder="")
    write_shard(ps[0], bad_src)
    write_index(ps, bad_src, {"a": 0})
    (_, [m]) = run_all(bad_src, exp, str(tmp_path / "bad_out"), augment="none")
    assert m["count"] == 3 and m["skipped"] == 1
    info = tokenizer_fingerprint(exp)
    _, [plan] = plan_token_shards(bad_src, info, "none", 32)
    with open(os.path.join(bad_src, ps[0].name), "r+b") as f:  # the input changes after planning
        f.seek(600)
        f.write(b"\xff")
    w = ShardTokenizer(exp, str(tmp_path / "late"), augment="none", resolution=32)
    with pytest.raises(ValueError, match="changed since it was planned"):
        w(plan)
    tok = load_tokenizer(exp)
    assert resolve_resolution(tok, None) == 32
    with pytest.raises(ValueError, match="32 px"):
        resolve_resolution(tok, 48)


def _keys(tar_path: str) -> list[str]:
    with tarfile.open(tar_path) as t:
        return list(dict.fromkeys(n.split(".")[0] for n in t.getnames()))


def _image(src: str, key: str) -> bytes:
    for s in read_index(src)["shards"]:
        with tarfile.open(os.path.join(src, s["name"])) as t:
            for m in t.getmembers():
                if m.name.startswith(key + ".") and not m.name.endswith(".cls"):
                    return t.extractfile(m).read()
    raise KeyError(key)


def _first_image(src: str) -> bytes:
    return _image(src, _keys(os.path.join(src, read_index(src)["shards"][0]["name"]))[0])



