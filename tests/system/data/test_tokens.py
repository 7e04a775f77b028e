"""Token shards: format round trip, dtype choice, malformed samples, and the shared reader machinery
(exactly once per epoch over ranks x workers, exact resume)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from system.data import TokenShardReader, write_token_set
from system.data.shards import plan_shards, write_index, write_shard, write_tar
from system.data.tokens import (
    TokenShardPlan,
    decode_token_sample,
    encode_token_sample,
    token_dtype,
    token_meta,
    write_token_shard,
)

V, L = 512, 8


def codes_for(n: int, vocab: int = V, length: int = L, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (n, length))


def read_epoch(r: TokenShardReader) -> dict[str, tuple[list[int], int]]:
    out = {}
    for b in r.one_epoch():
        assert b["codes"].dtype == torch.long and b["label"].dtype == torch.long
        for k, c, y in zip(b["key"], b["codes"].tolist(), b["label"].tolist()):
            assert k not in out, f"{k} twice in one epoch"
            out[k] = (c, y)
    return out


def test_round_trip_and_meta(tmp_path):
    codes, labels = codes_for(14), np.arange(14) % 3
    idx = write_token_set(str(tmp_path), codes, labels, V, num_shards=3, augment="flip")
    assert idx["num_samples"] == 14 and len(idx["shards"]) == 3 and idx == json.loads((tmp_path / "index.json").read_text())
    assert idx["tokens"] == token_meta(idx) and idx["tokens"]["dtype"] == "uint16" and idx["tokens"]["seq_len"] == L
    r = TokenShardReader(str(tmp_path), batch_size=4, drop_last=False)
    assert r.meta["augment"] == "flip" and (r.seq_len, r.vocab_size) == (L, V) and r.classes == idx["classes"]
    got = read_epoch(r)
    want = {f"s{i // 2:06d}_a{i % 2}": (codes[i].tolist(), int(labels[i])) for i in range(14)}
    assert got == want


def test_dtype_selection_and_range():
    assert token_dtype(1 << 16) == np.dtype("<u2") and token_dtype((1 << 16) + 1) == np.dtype("<i4")
    with pytest.raises(ValueError, match="vocab_size"):
        token_dtype(0)
    assert token_dtype(1 << 31) == np.dtype("<i4") and token_dtype(1 << 32) == np.dtype("<i8")  # SemTok's 2^32 codes
    for vocab, dtype in ((1 << 16, np.uint16), (100_000, np.int32), (1 << 32, np.int64)):
        c = np.array([0, vocab - 1, 7])
        f = encode_token_sample(c, 3, 1, token_dtype(vocab))
        assert len(f["tok"]) == 3 * np.dtype(dtype).itemsize
        got, label, aug = decode_token_sample(f, token_dtype(vocab), 3)
        assert got.dtype == np.int64 and got.tolist() == c.tolist() and (label, aug) == (3, 1)
    with pytest.raises(ValueError, match="out of range"):
        encode_token_sample(np.array([70_000]), 0, 0, token_dtype(1 << 16))


def test_wide_vocab_set_reads_back(tmp_path):
    codes = codes_for(6, vocab=100_000)
    idx = write_token_set(str(tmp_path), codes, np.zeros(6, int), 100_000, num_shards=1)
    assert idx["tokens"]["dtype"] == "int32"
    got = read_epoch(TokenShardReader(str(tmp_path), batch_size=6, drop_last=False))
    assert sorted(c for c, _ in got.values()) == sorted(codes.tolist())


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        write_token_set(str(tmp_path / "a"), codes_for(4) + V, np.zeros(4, int), V)
    with pytest.raises(ValueError, match="views"):
        write_token_set(str(tmp_path / "b"), codes_for(5), np.zeros(5, int), V, augment="flip")
    with pytest.raises(ValueError, match="augment"):
        write_token_set(str(tmp_path / "c"), codes_for(4), np.zeros(4, int), V, augment="mirror")
    plan = TokenShardPlan("train", "x.tar", folder="")
    with pytest.raises(ValueError, match="twice"):
        write_token_shard(plan, str(tmp_path / "d"), [("k", codes_for(1)[0], 0, 0)] * 2, V)
    assert not (tmp_path / "d" / "x.tar").exists() and not (tmp_path / "d" / "x.tar.done.json").exists()


def test_malformed_samples_are_skipped_and_counted(tmp_path, caplog):
    dtype = token_dtype(V)
    good = [(f"g{i}", encode_token_sample(codes_for(1, seed=i)[0], i, 0, dtype)) for i in range(5)]
    short = ("short", {"tok": b"\x01\x00", "cls": b"1", "aug": b"0"})  # 1 code, index says 8
    nolabel = ("nolabel", {"tok": good[0][1]["tok"]})
    with pytest.raises(ValueError, match="codes"):
        decode_token_sample(short[1], dtype, L)
    with pytest.raises(ValueError, match="lacks"):
        decode_token_sample(nolabel[1], dtype, L)
    write_tar(str(tmp_path), "t-0.tar", "fp", good[:2] + [short, nolabel] + good[2:])
    plan = TokenShardPlan("train", "t-0.tar", folder="")
    plan.fingerprint = lambda: "fp"  # the marker written above
    idx = write_index([plan], str(tmp_path), {"a": 0}, extra={"tokens": {"dtype": "uint16", "seq_len": L, "vocab_size": V}})
    assert idx["num_samples"] == 7
    r = TokenShardReader(str(tmp_path), batch_size=3, drop_last=False)
    got = read_epoch(r)
    assert sorted(got) == [k for k, _ in sorted(good)] and r.skipped == 2
    assert "'short'" in caplog.text and "'nolabel'" in caplog.text


def test_image_index_is_not_a_token_set(tmp_path):
    items = [(b"x", f"k{i}", 0) for i in range(2)]
    plans = plan_shards(items, "train", 2, folder="")
    write_shard(plans[0], str(tmp_path))
    write_index(plans, str(tmp_path), {"a": 0})
    with pytest.raises(ValueError, match="not a token-shard index.*pretokenize"):
        TokenShardReader(str(tmp_path), batch_size=2)


def test_exactly_once_over_two_ranks_by_two_workers(tmp_path):
    n = 45
    write_token_set(str(tmp_path), codes_for(n), np.arange(n) % 5, V, num_shards=3)
    seen: dict[str, int] = {}
    for rank in range(2):
        r = TokenShardReader(str(tmp_path), rank=rank, world_size=2, batch_size=4, num_workers=2, seed=3, drop_last=False)
        for k in read_epoch(r):
            seen[k] = seen.get(k, 0) + 1
    assert sorted(seen) == [f"s{i:06d}_a0" for i in range(n)] and set(seen.values()) == {1}


def test_resume_mid_epoch_continues_identically(tmp_path):
    write_token_set(str(tmp_path), codes_for(40), np.arange(40) % 4, V, num_shards=4)
    args = dict(rank=1, world_size=2, batch_size=3, num_workers=2, seed=7)
    a = TokenShardReader(str(tmp_path), **args)
    it = iter(a)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(a.state_dict()))  # as a checkpoint stores it
    want = [next(it) for _ in range(9)]  # runs into the next epoch
    b = TokenShardReader(str(tmp_path), **args)
    b.load_state_dict(state)
    got = [batch for _, batch in zip(range(9), b)]
    assert [g["key"] for g in got] == [w["key"] for w in want]
    assert all(torch.equal(g["codes"], w["codes"]) and torch.equal(g["label"], w["label"]) for g, w in zip(got, want))
    assert a.state_dict() == b.state_dict()
