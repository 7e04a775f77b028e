import os

import pytest
import torch

from cluster.engine import DeepSpeedStrategy, deep_merge, frozen
from system.config import DeepSpeedConfig, OptimConfig
from system.methods.base import DataSpec
from toy_method import ToyConfig, ToyDiscriminator, ToyGenerator, ToyMethod

CPU = torch.device("cpu")


def strategy(stage: int, **ds) -> DeepSpeedStrategy:
    optim = OptimConfig(lr=1e-2, grad_clip=1.0, weight_decay=0.05)
    return DeepSpeedStrategy(DeepSpeedConfig(zero_stage=stage, **ds), optim, CPU, micro_batch_size=2, world_size=1)


def test_ds_config_from_schema():
    s = DeepSpeedStrategy(
        DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_params=True, extra={"zero_optimization": {"reduce_bucket_size": 7}, "x": 1}),
        OptimConfig(grad_accum=4, grad_clip=0.5, eps=1e-6),
        CPU, micro_batch_size=3, world_size=2,
    )
    c = s.ds_config(lr=0.1, betas=(0.5, 0.9))
    assert c["train_batch_size"] == 3 * 4 * 2 and c["gradient_accumulation_steps"] == 4
    assert c["gradient_clipping"] == 0.5
    z = c["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["reduce_bucket_size"] == 7 and z["contiguous_gradients"] is True  # extra merged, not replaced
    assert c["x"] == 1
    p = c["optimizer"]["params"]
    assert p["lr"] == 0.1 and p["betas"] == [0.5, 0.9] and p["eps"] == 1e-6 and p["torch_adam"] is False
    assert s.precision == "fp32" and c["torch_autocast"]["enabled"] is False  # auto on CPU
    gpu = DeepSpeedStrategy(DeepSpeedConfig(), OptimConfig(), torch.device("cuda", 0), micro_batch_size=1, world_size=1)
    assert gpu.precision == "bf16" and gpu.ds_config(lr=1, betas=(0.9, 0.9))["torch_autocast"]["enabled"] is True


def test_ds_config_rejects_bad_combinations():
    with pytest.raises(ValueError, match="offload_params needs"):
        strategy(2, offload_params=True)
    with pytest.raises(ValueError, match="offload_optimizer needs"):
        strategy(0, offload_optimizer=True)
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


def _engines(stage: int, seed: int = 0):
    torch.manual_seed(seed)
    s = strategy(stage)
    gen = s.prepare(ToyGenerator(), lr=1e-2, betas=(0.9, 0.95))
    disc = s.prepare(ToyDiscriminator(), lr=1e-2, betas=(0.5, 0.9))
    return s, gen, disc


def _batch(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {"image": torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, "key": [f"k{i}a", f"k{i}b"]}


def _train(s, gen, disc, method, steps, start=0):
    for i in range(start, start + steps):
        b = _batch(i)
        with frozen(disc.module):
            out = method.step("gen", {"gen": gen.module, "disc": disc.module}, b, i, {})
        s.backward(gen, out.loss)
        assert all(p.grad is None for p in disc.module.parameters())  # no grads into the frozen disc
        s.step(gen)
        d = method.step("disc", {"disc": disc.module}, b, i, out.aux)
        s.backward(disc, d.loss)
        s.step(disc)


def _full(s, engine):
    return s.gathered_state_dict(engine)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_alternating_steps_save_load_gather(stage, dist_world1, tmp_path):
    method = ToyMethod(ToyConfig(), DataSpec(8, 1))
    s, gen, disc = _engines(stage)
    before = {k: v.clone() for k, v in _full(s, gen).items()}
    torch.manual_seed(1)
    _train(s, gen, disc, method, 2)
    after = _full(s, gen)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the generator learned
    s.save(gen, str(tmp_path), "gen")
    s.save(disc, str(tmp_path), "disc")
    rng = torch.get_rng_state()
    _train(s, gen, disc, method, 1, start=2)
    ref_gen, ref_disc = _full(s, gen), _full(s, disc)

    s2, gen2, disc2 = _engines(stage, seed=123)  # different init: everything must come from the files
    s2.load(gen2, str(tmp_path), "gen")
    s2.load(disc2, str(tmp_path), "disc")
    torch.set_rng_state(rng)
    _train(s2, gen2, disc2, method, 1, start=2)
    for ref, got in ((ref_gen, _full(s2, gen2)), (ref_disc, _full(s2, disc2))):
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), "resumed step differs from uninterrupted one"

    plain = ToyGenerator()  # gathered weights load into a plain module without DeepSpeed
    plain.load_state_dict(ref_gen)
    assert all(v.numel() > 0 for v in ref_gen.values())


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_generator_step_leaks_nothing_into_disc(stage, dist_world1):
    """A disc update after a generator step equals a disc update alone (same aux)."""
    method = ToyMethod(ToyConfig(), DataSpec(8, 1))
    b = _batch(0)
    torch.manual_seed(0)
    aux = {"rec": torch.rand(2, 3, 8, 8) * 2 - 1}

    s, gen, disc = _engines(stage)
    with frozen(disc.module):
        out = method.step("gen", {"gen": gen.module, "disc": disc.module}, b, 0, {})
    s.backward(gen, out.loss)
    s.step(gen)
    d = method.step("disc", {"disc": disc.module}, b, 0, aux)
    s.backward(disc, d.loss)
    s.step(disc)
    with_gen = _full(s, disc)

    s, gen, disc = _engines(stage)
    d = method.step("disc", {"disc": disc.module}, b, 0, aux)
    s.backward(disc, d.loss)
    s.step(disc)
    alone = _full(s, disc)
    assert all(torch.equal(with_gen[k], alone[k]) for k in alone)
    assert all(p.requires_grad for p in disc.module.parameters())  # frozen() restored the flags


def test_set_lr_and_local_params(dist_world1):
    s, gen, _ = _engines(3)
    s.set_lr(gen, 0.123)
    assert s.get_lr(gen) == pytest.approx(0.123)
    local = s.local_params(gen)
    n_full = sum(p.ds_numel for p in gen.module.parameters())
    assert sum(v.numel() for v in local.values()) >= n_full  # world 1: partitions hold everything
    assert s.is_partitioned(gen) and not strategy(2).is_partitioned(gen)
    assert os.environ.get("DS_ACCELERATOR") == "cpu"


class LocalFiles:
    """`cluster.engine.CheckpointFiles` over a local engine folder, recording what was asked for."""

    def __init__(self, folder):
        self.folder, self.where = str(folder), str(folder)
        self.names = sorted(os.listdir(folder))
        self.asked: list[str] = []

    def path(self, name: str) -> str:
        self.asked.append(name)
        return os.path.join(self.folder, name)

    def release(self, name: str) -> None:
        pass


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_load_files_and_resharded_load_continue_exactly(stage, dist_world1, tmp_path):
    """`load_files` (what a resume uses; ZeRO 1/2 without DeepSpeed's module file) and the
    re-partitioning path (another world size; here the same) restore weights, Adam moments and
    step exactly: the next step equals the uninterrupted one."""
    method = ToyMethod(ToyConfig(), DataSpec(8, 1))
    s, gen, disc = _engines(stage)
    torch.manual_seed(1)
    _train(s, gen, disc, method, 2)
    s.save(gen, str(tmp_path), "gen")
    s.save(disc, str(tmp_path), "disc")
    rng = torch.get_rng_state()
    _train(s, gen, disc, method, 1, start=2)
    ref_gen, ref_disc = _full(s, gen), _full(s, disc)

    s2, gen2, disc2 = _engines(stage, seed=123)
    files = LocalFiles(tmp_path / "gen")
    s2.load_files(gen2, files, same_world=True)
    if stage:
        s2.load_resharded(disc2, LocalFiles(tmp_path / "disc"))
    else:
        s2.load_files(disc2, LocalFiles(tmp_path / "disc"), same_world=False)
    shard, model = "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"
    assert set(files.asked) == {0: {"mp_rank_00_model_states.pt"}, 1: {"ds_model_meta.pt", shard},
                                2: {"ds_model_meta.pt", shard}, 3: {model, shard}}[stage]
    torch.set_rng_state(rng)
    _train(s2, gen2, disc2, method, 1, start=2)
    for ref, got in ((ref_gen, _full(s2, gen2)), (ref_disc, _full(s2, disc2))):
        assert all(torch.equal(ref[k], got[k]) for k in ref), "step after a re-partitioned load differs"
    if stage in (1, 2):  # another stage re-partitions too (the layouts differ, the values do not)
        s3, gen3, _ = _engines(3 if stage == 2 else 2, seed=7)
        s3.load_resharded(gen3, LocalFiles(tmp_path / "gen"))
        s4, gen4, _ = _engines(stage, seed=7)
        s4.load_resharded(gen4, LocalFiles(tmp_path / "gen"))
        other, same = _full(s3, gen3), _full(s4, gen4)
        assert other.keys() == same.keys() and all(torch.equal(other[k], same[k]) for k in same)


def test_rank_needs_only_its_own_partition():
    needs = DeepSpeedStrategy.rank_needs
    assert needs(None, "mp_rank_00_model_states.pt", 1)
    assert needs(None, "zero_pp_rank_1_mp_rank_00_optim_states.pt", 1)
    assert not needs(None, "zero_pp_rank_0_mp_rank_00_optim_states.pt", 1)
    assert not needs(None, "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt", 1)
    assert needs(None, "zero_pp_rank_3_mp_rank_00_model_states.pt", 3)
    assert not needs(None, "zero_pp_rank_3_mp_rank_00_model_states.pt", 2)


def test_param_groups_keep_named_parameters_out_of_weight_decay():
    """ModuleSpec.no_decay: the named parameters join the biases and norms in the no-decay group."""
    from cluster.engine import param_groups
    from system.models.gpt import GPT
    from system.models.registry import gpt_config

    gpt = GPT(gpt_config("debug-tiny"))
    params = dict(gpt.named_parameters())
    decay, no_decay = param_groups(gpt, 0.05)
    assert any(p is params["tok_embeddings.weight"] for p in decay["params"])
    decay, no_decay = param_groups(gpt, 0.05, gpt.embedding_names())
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    for name in ("tok_embeddings.weight", "cls_embedding.weight"):
        assert any(p is params[name] for p in no_decay["params"]) and not any(p is params[name] for p in decay["params"])
    assert any(p is params["output.weight"] for p in decay["params"])
    with pytest.raises(ValueError, match="no_decay names parameters the module does not have"):
        param_groups(gpt, 0.05, ("nope.weight",))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_engines_keep_deepspeeds_muon_compile_out_and_train(dist_world1, stage):
    """cluster.engine stands in for DeepSpeed's Muon modules (their import compiles: torch._dynamo
    and torch._inductor, 2-5 s per rank): every ZeRO stage builds, steps and checks its optimizer
    without them, and the stand-ins refuse to be used, naming why."""
    import sys

    from cluster.engine import MUON_MODULES

    before = {m for m in ("torch._inductor", "torch._dynamo") if m in sys.modules}
    s, gen, disc = _engines(stage)
    _train(s, gen, disc, ToyMethod(ToyConfig(), DataSpec(8, 1)), 2)
    assert "AdamW" in type(gen.optimizer.optimizer if stage else gen.optimizer).__name__ and s.get_lr(gen) > 0
    assert {m for m in ("torch._inductor", "torch._dynamo") if m in sys.modules} == before
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
    from deepspeed.runtime.zero.muon.original_muon import muon_update

    with pytest.raises(RuntimeError, match=f"Muon optimizer is not available here: .* stands in for {MUON_MODULES[0]}"):
        MuonWithAuxAdam([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(RuntimeError, match=f"stands in for {MUON_MODULES[1]}"):
        muon_update(torch.zeros(2, 2), torch.zeros(2, 2))
