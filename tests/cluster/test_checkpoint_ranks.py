"""Checkpoints of 2 and 3 ranks (spawned processes, gloo, DeepSpeed on CPU; no Ray): a resume at
the same world size fetches per rank only its own ZeRO partition and continues bit-identically; a
resume at another world size (2 -> 3 -> 2) re-partitions the fp32 master weights, Adam moments and
step, the partitioned EMA and the per-rank state exactly, fetching only the old shards it needs."""
from __future__ import annotations

import os
import re

import pytest
import torch

from multirank import run_ranks
from toy_method import ToyGenerator

CPU = torch.device("cpu")
OPTIM = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


class CountingFS:
    """An fsspec filesystem that counts the bytes fetched per path (everything else passes through)."""

    def __init__(self, fs):
        self._fs, self.read = fs, {}

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def get_file(self, src, dst, **kwargs):
        out = self._fs.get_file(src, dst, **kwargs)
        self.read[src] = self.read.get(src, 0) + os.path.getsize(dst)
        return out

    def cat_file(self, path, *args, **kwargs):
        data = self._fs.cat_file(path, *args, **kwargs)
        self.read[path] = self.read.get(path, 0) + len(data)
        return data


def _setup(stage: int, world: int, rank: int, seed: int):
    from cluster.checkpoint import TrainState
    from cluster.engine import DeepSpeedStrategy
    from system.config import DeepSpeedConfig, OptimConfig
    from system.methods.base import DataSpec
    from system.train_utils import EMA
    from toy_method import ToyConfig, ToyGenerator, ToyMethod

    torch.manual_seed(seed)  # the same initial model on every rank
    s = DeepSpeedStrategy(DeepSpeedConfig(zero_stage=stage), OptimConfig(lr=1e-2), CPU, micro_batch_size=2, world_size=world)
    gen = s.prepare(ToyGenerator(), lr=1e-2, betas=(0.9, 0.95))
    torch.manual_seed(seed + 100 + rank)  # per-rank dropout / noise
    state = TrainState(step=0, emas={"gen": EMA(s.local_params(gen), 0.9)}, ema_partitioned=s.is_partitioned(gen),
                       method=ToyMethod(ToyConfig(gan=False), DataSpec(8, 1)), modules={"gen": gen.module})
    return s, gen, state


def _train(s, gen, state, n: int, rank: int) -> None:
    for _ in range(n):
        g = torch.Generator().manual_seed(1000 * state.step + rank)
        batch = {"image": torch.rand(2, 3, 8, 8, generator=g) * 2 - 1}
        out = state.method.step("gen", {"gen": gen.module}, batch, state.step, {})
        s.backward(gen, out.loss)
        s.step(gen)
        state.emas["gen"].update(s.local_params(gen))
        state.step += 1


def _store(url: str):
    from cluster.checkpoint import CheckpointStore

    store = CheckpointStore(url)
    store.fs = CountingFS(store.fs)
    return store


def _commit(store, s, gen, state, rank, world):
    from cluster.checkpoint import commit_checkpoint

    return commit_checkpoint(store, s, {"gen": gen}, state, rank=rank, world_size=world, run_name="t", keep_last=5)


def _restore(store, s, gen, state, rank, world):
    from cluster.restore import restore_checkpoint

    restore_checkpoint(store, store.latest_complete(), s, {"gen": gen}, state, rank=rank, world_size=world, run_name="t")


def _reads(store) -> dict[str, int]:
    base = store._path("checkpoints")
    return {p[len(base):].lstrip("/"): n for p, n in store.fs.read.items() if p.startswith(base)}


# ---------------------------------------------------------------------------- same world size
def _same_world_rank(rank: int, world: int, stage: int, url: str) -> dict:
    s, gen, state = _setup(stage, world, rank, seed=0)
    _train(s, gen, state, 2, rank)
    store = _store(url)
    _commit(store, s, gen, state, rank, world)
    _train(s, gen, state, 1, rank)  # the uninterrupted continuation
    want = s.gathered_state_dict(gen)

    s2, gen2, state2 = _setup(stage, world, rank, seed=5)  # another init: everything must come from the files
    store2 = _store(url)
    _restore(store2, s2, gen2, state2, rank, world)
    _train(s2, gen2, state2, 1, rank)
    got = s2.gathered_state_dict(gen2)
    return {"read": _reads(store2), "same": want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want),
            "calls": state2.method.calls}


@pytest.mark.parametrize("stage", [2, 3])
def test_each_rank_fetches_only_its_own_partition(stage, tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_STAGE_DIR", str(tmp_path / "stage"))
    url = str(tmp_path / "run")
    out = run_ranks(_same_world_rank, 2, stage, url)
    assert all(o["same"] for o in out), "resumed step differs from the uninterrupted one"
    assert [o["calls"] for o in out] == [3, 3]
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002" / "gen"
    shards = {p.name: p.stat().st_size for p in ckpt.iterdir() if OPTIM.match(p.name)}
    assert len(shards) == 2
    for rank, o in enumerate(out):
        read = {k.split("/", 1)[1]: n for k, n in o["read"].items()}
        engine = {k.split("/", 1)[1]: n for k, n in read.items() if k.startswith("gen/")}
        own = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        assert {k for k in engine if "optim_states" in k} == {own}
        assert sum(n for k, n in engine.items() if "optim_states" in k) == shards[own]
        assert shards[own] <= 0.6 * sum(shards.values())  # about 1/world of the optimizer state
        # ZeRO 1/2: the weight-free model metadata, not DeepSpeed's module file (every weight, on every rank)
        model = {"ds_model_meta.pt"} if stage < 3 else {f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"}
        assert set(engine) - {own} == model
        if stage < 3:  # it holds no parameter value
            weights = 4 * sum(p.numel() for p in ToyGenerator().parameters())
            assert engine["ds_model_meta.pt"] < (ckpt / "mp_rank_00_model_states.pt").stat().st_size - weights
        assert {k.split("/", 1)[0] for k in read if k.startswith("rank_")} == {f"rank_{rank:05d}"}
        if stage < 3:  # the whole EMA: fetched by rank 0 and broadcast
            assert ("shared/ema_gen.safetensors" in read) == (rank == 0)


# ---------------------------------------------------------------------------- another world size
def _full_state(gen) -> dict:
    """Collective: every parameter's full fp32 master value and Adam moments (DeepSpeed's own API)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = gen.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):  # ZeRO 1/2 link the moments of group 0 only (after its
        opt._hp_optimizer_states_linked = False  # step, before group 1 has state): link them all again
        opt._lazy_init_hp_params_optimizer_state()
    return {n: {"fp32": safe_get_full_fp32_param(p).detach().cpu().clone(),
                **{k: safe_get_full_optimizer_state(p, k).detach().cpu().clone() for k in ("exp_avg", "exp_avg_sq")}}
            for n, p in gen.module.named_parameters()}


def _rank_view(s, gen, state) -> dict:
    return {"full": _full_state(gen), "weights": s.gathered_state_dict(gen),
            "ema": {k: v.clone() for k, v in state.emas["gen"].shadow.items()},
            "numel": {n: (p.ds_numel if hasattr(p, "ds_numel") else p.numel()) for n, p in gen.module.named_parameters()},
            "steps": sorted({float(st["step"]) for st in gen.optimizer.optimizer.state.values()}),
            "calls": state.method.calls, "step": state.step}


def _reshard_rank(rank: int, world: int, stage: int, url: str, phase: str) -> dict:
    if phase == "start":
        s, gen, state = _setup(stage, world, rank, seed=0)
        _train(s, gen, state, 2, rank)
        view = _rank_view(s, gen, state)
        _commit(_store(url), s, gen, state, rank, world)
        return view
    s, gen, state = _setup(stage, world, rank, seed=5)
    store = _store(url)
    _restore(store, s, gen, state, rank, world)
    loaded = {**_rank_view(s, gen, state), "read": _reads(store), "rand": torch.rand(1).item()}
    if phase == "grow":  # keep training at the new size, then checkpoint for the way back
        _train(s, gen, state, 1, rank)
        loaded["after"] = _rank_view(s, gen, state)
        _commit(_store(url), s, gen, state, rank, world)
    return loaded


def _full_ema(views: list[dict], partitioned: bool) -> dict:
    if not partitioned:
        return views[0]["ema"]
    numel = views[0]["numel"]
    return {n: torch.cat([v["ema"][n].reshape(-1) for v in views])[: numel[n]] for n in numel}


def _assert_same_state(want: dict, got: dict, what: str) -> None:
    for name, tensors in want["full"].items():
        for key, value in tensors.items():
            assert torch.equal(value, got["full"][name][key]), f"{what}: {name} {key}"
    for name, value in want["weights"].items():
        assert torch.equal(value, got["weights"][name]), f"{what}: working weight {name}"


def _optim_shards_read(view: dict) -> set[int]:
    return {int(OPTIM.search(k)[1]) for k in view["read"] if OPTIM.search(k)}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_at_another_world_size_repartitions_exactly(stage, tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_STAGE_DIR", str(tmp_path / "stage"))
    url = str(tmp_path / "run")
    part = stage == 3
    start = run_ranks(_reshard_rank, 2, stage, url, "start")
    grown = run_ranks(_reshard_rank, 3, stage, url, "grow")  # 2 -> 3 ranks
    _assert_same_state(start[0], grown[0], "2 -> 3")
    for g in grown:
        assert g["steps"] == [2.0] and g["step"] == 2 and g["calls"] == 2  # the extra rank 2 takes rank 0's state
    assert _full_ema(grown, part).keys() == _full_ema(start, part).keys()
    assert all(torch.equal(_full_ema(start, part)[k], _full_ema(grown, part)[k]) for k in _full_ema(start, part))
    assert len({g["rand"] for g in grown}) == 3  # rank 2 does not replay rank 0's random stream
    # each new rank fetches only the old shards overlapping its new partition
    assert _optim_shards_read(grown[0]) == {0} and _optim_shards_read(grown[2]) == {1}
    assert _optim_shards_read(grown[1]) == {0, 1}
    ema_read = [{k.split("/")[1] for k in g["read"] if k.endswith("ema_gen.safetensors")} for g in grown]
    if part:  # the EMA slices too
        assert ema_read == [{"rank_00000"}, {"rank_00000", "rank_00001"}, {"rank_00001"}]
    else:
        assert ema_read == [{"shared"}, set(), set()]

    shrunk = run_ranks(_reshard_rank, 2, stage, url, "shrink")  # 3 -> 2 ranks (a retry on a smaller cluster)
    after = grown[0]["after"]
    _assert_same_state(after, shrunk[0], "3 -> 2")
    assert all(s["steps"] == [3.0] and s["step"] == 3 for s in shrunk)
    want_ema, got_ema = _full_ema([g["after"] for g in grown], part), _full_ema(shrunk, part)
    assert all(torch.equal(want_ema[k], got_ema[k]) for k in want_ema)
