"""VAπ rollouts with our 1D tokenizer + GPT and with a LlamaGen-style VQ + GPT (random weights)."""
import pytest
import torch

from system.losses.lpips import LPIPS
from system.methods.grpo import GRPOConfig
from system.methods.vapi import Rollouts, RolloutConfig, VapiPolicy, frozen_tokenizer, noise_tokens, rollout, vapi_loss
from system.models.gpt import GPT
from system.models.registry import gpt_config
from system.models.tokenizer1d import Tokenizer1D, tokenizer_config
from system.models.vqgan import VQGANConfig, VQModel


@pytest.fixture(scope="module")
def lpips():
    with pytest.warns(UserWarning):
        return LPIPS()


def _ours():
    torch.manual_seed(0)
    tc = tokenizer_config("debug-tiny")
    ar = GPT(gpt_config("debug-tiny", vocab_size=64, block_size=tc.seq_len, code_dim=tc.latent_dim, num_classes=8))
    tok = frozen_tokenizer(Tokenizer1D(tc))
    return VapiPolicy(ar.eval(), tok.codebook), tok


def _llamagen():
    torch.manual_seed(0)
    vq = VQModel(VQGANConfig(codebook_size=64, codebook_dim=8, ch=32, ch_mult=(1, 2, 2, 2), z_channels=32, num_res_blocks=1))
    ar = GPT(gpt_config("debug-tiny", vocab_size=64, block_size=16, num_classes=8))  # 32 px / 8 = 4x4 grid
    return VapiPolicy(ar.eval()), frozen_tokenizer(vq)


@pytest.mark.parametrize("build", [_ours, _llamagen])
def test_rollout_shapes_logprobs_and_determinism(build, lpips):
    policy, tok = build()
    imgs = torch.rand(2, 3, 32, 32) * 2 - 1
    labels = torch.tensor([1, 3])
    cfg = RolloutConfig(group_size=3, noise_p=0.5, decode_chunk=4)
    ro = rollout(policy, tok, lpips, imgs, labels, torch.tensor([10, 11]), cfg, torch.Generator().manual_seed(1))
    assert ro.tokens.shape == (6, 16) and ro.logp.shape == (6, 16) and ro.rewards.shape == (6,)
    assert ro.group_ids.tolist() == [10, 10, 10, 11, 11, 11]
    assert (ro.rewards < 0).all()
    torch.testing.assert_close(ro.rewards, -(ro.mse + ro.lpips))
    assert (ro.inputs != ro.gt_tokens).any()  # contextual noise changed some inputs
    logits = policy(ro.inputs, labels).log_softmax(-1)
    torch.testing.assert_close(ro.logp, logits[ro.image_index].gather(-1, ro.tokens[..., None])[..., 0])
    again = rollout(policy, tok, lpips, imgs, labels, torch.tensor([10, 11]), cfg, torch.Generator().manual_seed(1))
    assert torch.equal(again.tokens, ro.tokens)
    # the loss is on-policy here: ratios are 1 and gradients reach the AR weights only
    loss, m = vapi_loss(policy, ro, GRPOConfig())
    loss.backward()
    assert abs(m["ratio_mean"].item() - 1) < 1e-5 and m["clip_frac"].item() == 0
    assert policy.ar.output.weight.grad is not None
    assert all(p.grad is None for p in tok.parameters())
    both = Rollouts.cat([ro, again])
    assert both.image_index.tolist()[-3:] == [3, 3, 3] and both.inputs.shape[0] == 4


def test_noise_and_config_errors():
    t = torch.zeros(4, 100, dtype=torch.long)
    n = noise_tokens(t, 0.5, 1000, torch.Generator().manual_seed(0))
    assert 0.3 < (n != 0).float().mean() < 0.7
    assert torch.equal(noise_tokens(t, 0.0, 1000), t)
    with pytest.raises(ValueError, match="group_size"):
        RolloutConfig(group_size=1)
    ar = GPT(gpt_config("debug-tiny", vocab_size=64, block_size=16, code_dim=16, num_classes=8))
    with pytest.raises(ValueError, match="codebook"):
        VapiPolicy(ar)


def test_split_keeps_whole_groups_and_cat_inverts_it(lpips):
    policy, tok = _ours()
    imgs = torch.rand(4, 3, 32, 32) * 2 - 1
    ro = rollout(policy, tok, None, imgs, torch.tensor([0, 1, 2, 3]), torch.tensor([7, 8, 9, 10]), RolloutConfig(group_size=3),
                 torch.Generator().manual_seed(0))
    a, b = ro.split(2)
    assert a.group_ids.tolist() == [7] * 3 + [8] * 3 and b.group_ids.tolist() == [9] * 3 + [10] * 3
    assert b.image_index.tolist() == [0, 0, 0, 1, 1, 1] and torch.equal(b.inputs, ro.inputs[2:])
    back = Rollouts.cat([a, b])
    for k in Rollouts.__dataclass_fields__:
        assert torch.equal(getattr(back, k), getattr(ro, k)), k
    # the GRPO loss of the whole batch is the mean of the equal halves' losses (data-parallel update)
    full, _ = vapi_loss(policy, ro, GRPOConfig())
    halves = [vapi_loss(policy, p, GRPOConfig())[0] for p in (a, b)]
    torch.testing.assert_close(full, (halves[0] + halves[1]) / 2)
    with pytest.raises(ValueError, match="split evenly"):
        ro.split(3)


def test_check_fit_names_the_mismatch():
    from system.methods.vapi import check_fit

    policy, tok = _ours()
    check_fit(policy, tok, 32)
    with pytest.raises(ValueError, match="works at 32 px"):
        check_fit(policy, tok, 64)
    policy, vq = _llamagen()
    check_fit(policy, vq, 32)
    with pytest.raises(ValueError, match="gives 64 codes per 64 px image but the AR model generates 16"):
        check_fit(policy, vq, 64)
    with pytest.raises(ValueError, match="not a multiple"):
        check_fit(policy, vq, 36)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_on_policy_ratio_is_exactly_one_at_any_temperature(temperature):
    """Old log-probs come from logits / T in the rollout; the loss uses the same T (it used not to:
    at T=0.7 about a third of on-policy tokens were clipped)."""
    from system.methods.vapi import rollout_config
    from system.config import VapiConfig

    policy, tok = _ours()
    torch.nn.init.normal_(policy.ar.output.weight, std=0.5)  # peaked logits: a wrong T shows
    rcfg = rollout_config(VapiConfig(group_size=4, temperature=temperature, w_lpips=0.0))
    imgs = torch.rand(2, 3, 32, 32) * 2 - 1
    ro = rollout(policy, tok, None, imgs, torch.tensor([1, 3]), torch.tensor([0, 1]), rcfg, torch.Generator().manual_seed(0))
    _, m = vapi_loss(policy, ro, rcfg.grpo)
    assert float(m["ratio_mean"]) == pytest.approx(1.0, abs=1e-6) and float(m["clip_frac"]) == 0.0
    wrong = GRPOConfig(temperature=1.0)
    assert float(vapi_loss(policy, ro, wrong)[1]["clip_frac"]) > 0.05  # the old behaviour clipped on-policy tokens


def test_update_mode_train_uses_dropout_eval_does_not():
    """VapiMethod's step runs the policy in train mode by default (official: dropout + class
    dropout, so on-policy ratios differ from 1), in eval mode with update_mode=eval (exactly 1)."""
    from system.config import VapiConfig
    from system.methods.base import DataSpec
    from system.methods.vapi import VapiMethod, rollout_config

    policy, tok = _ours()
    torch.nn.init.normal_(policy.ar.output.weight, std=0.5)  # zero-initialised: uniform logits hide any mode
    policy.ar.cfg.class_dropout = 0.5
    for mod in policy.ar.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.3
    rcfg = rollout_config(VapiConfig(group_size=4, w_lpips=0.0))
    ro = rollout(policy, tok, None, torch.rand(4, 3, 32, 32) * 2 - 1, torch.tensor([1, 3, 2, 0]), torch.arange(4), rcfg,
                 torch.Generator().manual_seed(0))
    batch = {"rollouts": ro, "stats": {"reward_mean": float(ro.rewards.mean())}}
    ratios = {}
    for mode in ("train", "eval"):
        m = VapiMethod.__new__(VapiMethod)  # the step alone: no export to load
        m.cfg, m.rcfg, m.reference = VapiConfig(update_mode=mode, w_lpips=0.0), rcfg, None
        m.data = DataSpec(32, 8)
        torch.manual_seed(0)
        out = m.step("policy", {"policy": policy}, batch, 0, {})
        ratios[mode] = float(out.metrics["ratio_mean"])
        assert float(out.metrics["reward_mean"]) == pytest.approx(batch["stats"]["reward_mean"])
    assert ratios["eval"] == pytest.approx(1.0, abs=1e-6) and abs(ratios["train"] - 1.0) > 1e-4


def _masked_export(folder):
    """A tiny export whose AR model is masked (bidirectional, SemTok's kind of generator)."""
    from system.models.artifacts import Artifact, save_export

    torch.manual_seed(0)
    tc = tokenizer_config("debug-tiny")
    ar = GPT(gpt_config("debug-tiny", vocab_size=64, block_size=tc.seq_len, num_classes=8, bidirectional=True))
    save_export(str(folder), {"tokenizer": Artifact.of("tokenizer1d", Tokenizer1D(tc)), "ar": Artifact.of("gpt", ar)})
    return str(folder)


def test_masked_generator_is_refused_before_anything_is_built(tmp_path):
    """VAπ samples every position from one teacher-forced forward: undefined for a masked model. The
    config check (run before Ray) refuses it from model.json alone, naming the key; loading refuses it
    through the Generator protocol's `masked`."""
    from system.config import VapiConfig
    from system.methods.base import DataSpec
    from system.methods.vapi import VapiMethod, load_parts

    export = _masked_export(tmp_path / "masked")
    with pytest.raises(ValueError, match=r"method\.export_url.*masked.*undefined for a masked model"):
        VapiMethod.check(VapiConfig(export_url=export, w_lpips=0.0), DataSpec(32, 8))
    with pytest.raises(ValueError, match=r"method\.export_url.*undefined for a masked model"):
        load_parts(export, use_lpips=False)


def test_unread_prefix_codes_get_no_policy_gradient():
    """An AliTok tokenizer whose stage-2 decoder drops the prefix (the paper's) does not read the first
    P codes: the policy (clipped) term gives those positions no gradient, the CE prior still does;
    VapiMethod takes P from its tokenizer (`Tokenizer.unread_prefix`)."""
    import dataclasses

    from system.config import VapiConfig
    from system.methods.base import DataSpec
    from system.methods.vapi import VapiMethod, rollout_config

    torch.manual_seed(0)
    tc = dataclasses.replace(tokenizer_config("debug-tiny-alitok"), decoder_causal=False, decoder_reads_prefix=False)
    tok = frozen_tokenizer(Tokenizer1D(tc))
    P = tc.num_prefix_tokens
    assert tok.unread_prefix == P and tok.prefix_tokens == P
    ar = GPT(gpt_config("debug-tiny", vocab_size=64, prefix_tokens=P, rope="mixed", block_size=16, num_classes=8))
    torch.nn.init.normal_(ar.output.weight, std=0.5)
    policy = VapiPolicy(ar.eval())
    rcfg = rollout_config(VapiConfig(group_size=4, w_lpips=0.0, beta=0.0))
    ro = rollout(policy, tok, None, torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([1, 3]), torch.arange(2), rcfg,
                 torch.Generator().manual_seed(0))
    assert ro.tokens.shape == (8, P + 16)

    h = {}

    def keep(mod, args, out):  # the logits, with their gradient kept
        out.retain_grad()
        h["out"] = out

    def logit_grads(skip, beta=0.0):
        hook = policy.ar.output.register_forward_hook(keep)
        loss, _ = vapi_loss(policy, ro, dataclasses.replace(rcfg.grpo, beta=beta), policy_from=skip)
        loss.backward()
        hook.remove()
        policy.zero_grad()
        return h["out"].grad.abs().sum((0, 2))  # per position

    g = logit_grads(P)
    assert g[:P].eq(0).all() and g[P:].gt(0).all()
    assert logit_grads(0)[:P].gt(0).all()  # without the rule every position gets one
    assert logit_grads(P, beta=0.1)[:P].gt(0).all()  # the prior keeps covering the prefix

    m = VapiMethod.__new__(VapiMethod)  # the learner's step: the skip comes from its tokenizer
    m.cfg, m.rcfg, m.reference, m.data, m.tokenizer = VapiConfig(update_mode="eval", w_lpips=0.0, beta=0.0), rcfg, None, DataSpec(32, 8), tok
    hook = policy.ar.output.register_forward_hook(keep)
    m.step("policy", {"policy": policy}, {"rollouts": ro, "stats": {}}, 0, {}).loss.backward()
    hook.remove()
    assert h["out"].grad[:, :P].eq(0).all() and h["out"].grad[:, P:].abs().sum() > 0
