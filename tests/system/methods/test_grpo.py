"""GRPO math on hand-computed numbers, and a toy policy whose gradient favours better samples."""
import math

import torch

from system.methods.grpo import GRPOConfig, clipped_objective, group_advantages, grpo_loss, kl_k3, prior_ce


def test_group_advantages_hand_numbers():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0])
    g = torch.tensor([7, 7, 7, 3, 3])
    adv = group_advantages(r, g, eps=0.0 + 1e-12, clip=5.0)
    # group 7: mean 2, unbiased std 1 -> (-1, 0, 1); group 3: identical rewards -> 0
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0]))


def test_group_advantages_clip():
    n = 36  # one 1 among zeros: advantage (n-1)/sqrt(n) = 35/6 > 5 -> clipped; the rest -1/sqrt(n)
    r = torch.zeros(n)
    r[0] = 1.0
    adv = group_advantages(r, torch.zeros(n, dtype=torch.long), eps=1e-12, clip=5.0)
    assert adv[0].item() == 5.0
    torch.testing.assert_close(adv[1:], torch.full((n - 1,), -1 / 6))


def test_clipped_objective_hand_numbers():
    logp_old = torch.zeros(2, 2)
    logp_new = torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]]))
    adv = torch.tensor([1.0, -1.0])
    loss, frac = clipped_objective(logp_new, logp_old, adv, clip_eps=0.2)
    # row A=+1: min(1.5, 1.2)=1.2, min(0.5, 0.8)=0.5; row A=-1: min(-1.5,-1.2)=-1.5, min(-0.5,-0.8)=-0.8
    torch.testing.assert_close(loss, torch.tensor(-(1.2 + 0.5 - 1.5 - 0.8) / 4))
    torch.testing.assert_close(frac, torch.tensor(0.5))


def test_prior_ce_and_kl_hand_numbers():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    torch.testing.assert_close(prior_ce(logits, torch.tensor([[1]])), torch.tensor(-math.log(0.75)))
    assert kl_k3(torch.zeros(3), torch.zeros(3)).item() == 0.0
    d = math.log(0.5)  # ref half as likely: e^d - d - 1
    torch.testing.assert_close(kl_k3(torch.zeros(1), torch.full((1,), d)), torch.tensor(0.5 - d - 1))


def test_gradient_step_favours_higher_reward_samples():
    v = 4
    logits = torch.zeros(1, 1, v, requires_grad=True)  # toy policy: one position over 4 codes
    tokens = torch.arange(v).view(v, 1)  # each sample picked a different code
    logp_old = torch.full((v, 1), math.log(1 / v))
    rewards = torch.tensor([3.0, 2.0, 1.0, 0.0])
    opt = torch.optim.SGD([logits], lr=0.5)
    p0 = logits.softmax(-1).detach().clone()
    for _ in range(3):
        loss, m = grpo_loss(logits, torch.zeros(v, dtype=torch.long), tokens, logp_old, rewards,
                            torch.zeros(v, dtype=torch.long), torch.tensor([[0]]), GRPOConfig(beta=0.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    p1 = logits.softmax(-1).detach()[0, 0]
    assert p1[0] > p0[0, 0, 0] and p1[3] < p0[0, 0, 3]
    assert (p1[:-1] >= p1[1:]).all(), p1  # ordered like the rewards
    assert 0 < m["clip_frac"].item() <= 1  # the ratio reached the clip range
