"""Implicit / REPA cosine alignment, SemTok distillation and contrastive losses."""
from __future__ import annotations

import math

import pytest
import torch

from system.losses.align import (
    AlignConfig,
    ContrastiveConfig,
    DecoderAlignLoss,
    DirectAlignLoss,
    ImplicitAlignLoss,
    SemanticContrastiveLoss,
    SemanticDistillLoss,
    infer_grid,
    match_grid,
    mlp_projector,
)


def test_identity_projection_identical_features_give_minus_one() -> None:
    loss_fn = ImplicitAlignLoss(AlignConfig(in_dim=8, teacher_dim=8, depth=0))
    feats = torch.randn(2, 16, 8)
    assert loss_fn(feats, feats.clone()).item() == pytest.approx(-1.0, abs=1e-6)
    assert loss_fn(feats, -feats).item() == pytest.approx(1.0, abs=1e-6)
    # orthogonal features: cosine 0
    a = torch.zeros(1, 4, 2)
    a[..., 0] = 1
    b = torch.zeros(1, 4, 2)
    b[..., 1] = 1
    assert loss_fn.__class__(AlignConfig(2, 2, depth=0))(a, b).item() == pytest.approx(0.0, abs=1e-6)


def test_grid_mismatch_is_interpolated() -> None:
    loss_fn = DecoderAlignLoss(AlignConfig(in_dim=4, teacher_dim=4, depth=0))
    v = torch.randn(2, 1, 4)
    student = v.expand(2, 16, 4)  # 4x4 grid of a constant vector per sample
    teacher = v.expand(2, 4, 4) * 3  # 2x2 grid, same direction
    assert loss_fn(student, teacher).item() == pytest.approx(-1.0, abs=1e-5)
    assert loss_fn(v.expand(2, 4, 4), v.expand(2, 64, 4)).item() == pytest.approx(-1.0, abs=1e-5)  # upsample
    assert loss_fn(v.expand(2, 6, 4), v.expand(2, 6, 4), grid=(2, 3), teacher_grid=(3, 2)).item() == pytest.approx(-1.0, abs=1e-5)
    with pytest.raises(ValueError, match="not a square grid"):
        loss_fn(torch.randn(2, 6, 4), torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="teacher dim"):
        loss_fn(torch.randn(2, 4, 4), torch.randn(2, 4, 5))


def test_match_grid_layout() -> None:
    x = torch.arange(4.0).view(1, 4, 1)  # 2x2 grid [[0,1],[2,3]]
    up = match_grid(x, (2, 2), (4, 4)).view(4, 4)
    assert up[0, 0] == 0 and up[-1, -1] == 3 and up[0, -1] == 1 and up[-1, 0] == 2
    assert infer_grid(12, (3, 4)) == (3, 4)


def test_projector_shapes_and_align_gradients() -> None:
    torch.manual_seed(0)
    p = mlp_projector(6, 10, hidden_dim=12, depth=3)
    assert sum(isinstance(m, torch.nn.Linear) for m in p.modules()) == 3
    with pytest.raises(ValueError, match="in_dim == out_dim"):
        mlp_projector(6, 10, depth=0)
    loss_fn = ImplicitAlignLoss(AlignConfig(in_dim=6, teacher_dim=10, hidden_dim=12, depth=2))
    hidden = torch.randn(2, 16, 6, requires_grad=True)
    teacher = torch.randn(2, 4, 10, requires_grad=True)
    loss_fn(hidden, teacher).backward()
    assert hidden.grad.abs().sum() > 0
    assert teacher.grad is None  # teacher features are constants
    assert all(q.grad is not None for q in loss_fn.parameters())


def test_align_losses_gradcheck() -> None:
    torch.manual_seed(0)
    cos = ImplicitAlignLoss(AlignConfig(in_dim=3, teacher_dim=4, hidden_dim=5, depth=2)).double()
    teacher = torch.randn(2, 4, 4, dtype=torch.float64)
    hidden = torch.randn(2, 16, 3, dtype=torch.float64, requires_grad=True)  # 4x4 -> 2x2 resize
    assert torch.autograd.gradcheck(lambda h: cos(h, teacher), (hidden,))
    con = SemanticContrastiveLoss(ContrastiveConfig(token_dim=3, teacher_dim=4, depth=1, temperature=0.2)).double()
    tokens = torch.randn(3, 5, 3, dtype=torch.float64, requires_grad=True)
    t_feats = torch.randn(3, 4, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: con(z, t_feats)[0], (tokens,))


def test_semantic_distill_by_hand() -> None:
    loss_fn = SemanticDistillLoss(AlignConfig(in_dim=5, teacher_dim=5, depth=0))
    x = torch.randn(2, 4, 5, requires_grad=True)
    assert loss_fn(x, x.detach()).item() == pytest.approx(0.0)
    loss = loss_fn(x, x.detach() + 2.0)
    assert loss.item() == pytest.approx(4.0, rel=1e-6)
    loss.backward()
    assert torch.allclose(x.grad, torch.full_like(x, -2 * 2.0 / x.numel()))


def test_contrastive_by_hand_and_gradient() -> None:
    b, t = 3, 0.5
    loss_fn = SemanticContrastiveLoss(ContrastiveConfig(token_dim=3, teacher_dim=3, depth=0, temperature=t))
    eye = torch.eye(b)
    tokens = eye[:, None, :].repeat(1, 4, 1)  # pooled tokens of sample i = e_i
    teacher = eye[:, None, :].repeat(1, 9, 1) * 5  # pooled teacher of sample i = 5 e_i
    loss, acc = loss_fn(tokens, teacher)
    want = -math.log(math.exp(1 / t) / (math.exp(1 / t) + (b - 1)))
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert acc.item() == 1.0
    shuffled, acc2 = loss_fn(tokens, teacher.roll(1, dims=0))
    assert shuffled.item() > loss.item() and acc2.item() == 0.0
    proj = SemanticContrastiveLoss(ContrastiveConfig(token_dim=4, teacher_dim=3, depth=1))
    tok = torch.randn(b, 4, 4, requires_grad=True)
    proj(tok, torch.randn(b, 9, 3))[0].backward()
    assert tok.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="temperature"):
        SemanticContrastiveLoss(ContrastiveConfig(3, 3, temperature=0.0))


def test_bf16_inputs_resize_and_loss_in_fp32() -> None:
    loss_fn = ImplicitAlignLoss(AlignConfig(in_dim=4, teacher_dim=4, depth=0))
    v = torch.randn(2, 1, 4)
    loss = loss_fn(v.expand(2, 16, 4).bfloat16(), v.expand(2, 4, 4).bfloat16())  # 4x4 -> 2x2 antialiased
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(-1.0, abs=1e-2)


def test_direct_alignment_is_raster_order_one_to_one_or_pooled() -> None:
    """Latent i against teacher patch i (raster order) when L == N; the teacher's raster sequence
    average-pooled to L tokens otherwise. Gradients reach the latents, never the teacher."""
    loss_fn = DirectAlignLoss(AlignConfig(in_dim=4, teacher_dim=4, depth=0))
    t = torch.randn(2, 16, 4)
    assert loss_fn(t.clone(), t).item() == pytest.approx(-1.0, abs=1e-6)
    assert loss_fn(t.flip(1), t).item() > -0.9  # order matters: a permutation of the latents is not aligned
    pooled = t.view(2, 4, 4, 4).mean(2)  # 16 teacher tokens -> 4 latents: mean of 4 consecutive patches
    assert loss_fn(pooled, t).item() == pytest.approx(-1.0, abs=1e-6)
    z = torch.randn(2, 5, 6, requires_grad=True)  # any L, here not a square
    teacher = torch.randn(2, 16, 3, requires_grad=True)
    DirectAlignLoss(AlignConfig(in_dim=6, teacher_dim=3, hidden_dim=8, depth=2))(z, teacher).backward()
    assert z.grad.abs().sum() > 0 and teacher.grad is None
