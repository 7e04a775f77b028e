"""L1/L2, next-token cross-entropy with label smoothing, APR loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from system.losses.recon import apr_loss, l1_loss, l2_loss, ntp_loss


def test_l1_l2_by_hand() -> None:
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    tgt = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    assert l1_loss(pred, tgt).item() == pytest.approx(6.0 / 4)
    assert l2_loss(pred, tgt).item() == pytest.approx(14.0 / 4)
    assert torch.allclose(l2_loss(pred, tgt, reduction="none"), torch.tensor([2.5, 4.5]))
    with pytest.raises(ValueError, match="shape"):
        l1_loss(pred, tgt[:1])
    with pytest.raises(ValueError, match="reduction"):
        l2_loss(pred, tgt, reduction="sum")  # type: ignore[arg-type]


def test_ntp_label_smoothing_matches_manual_formula() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[0, 1, 2], [3, 4, 0]])
    eps = 0.1
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
    uniform = -logp.mean(dim=-1)
    want = ((1 - eps) * nll + eps * uniform).mean()
    loss, _ = ntp_loss(logits, targets, label_smoothing=eps)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_ntp_accuracy_mask_and_ignore() -> None:
    logits = torch.full((1, 4, 3), -5.0)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[0, 2, 0] = logits[0, 3, 0] = 5.0  # argmax 1,2,0,0
    targets = torch.tensor([[1, 2, 1, 0]])
    loss, acc = ntp_loss(logits, targets)
    assert acc.item() == pytest.approx(0.75)
    mask = torch.tensor([[False, False, True, True]])
    _, acc_m = ntp_loss(logits, targets, mask=mask)
    assert acc_m.item() == pytest.approx(0.5)
    loss_i, acc_i = ntp_loss(logits, torch.tensor([[1, 2, -100, -100]]))
    assert acc_i.item() == 1.0
    lp = torch.log_softmax(torch.tensor([5.0, -5.0, -5.0]), 0)[0]
    assert loss_i.item() == pytest.approx(-lp.item(), rel=1e-5)
    assert not acc.requires_grad


def test_ntp_bitwise_two_class_and_gradient() -> None:
    logits = torch.zeros(2, 4, 6, 2, requires_grad=True)  # (B, L, bits, 2)
    bits = torch.randint(0, 2, (2, 4, 6))
    loss, _ = ntp_loss(logits, bits, label_smoothing=0.01)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)  # uniform logits
    loss.backward()
    assert logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="vocab"):
        ntp_loss(logits, bits[..., :3])


class _ConstLPIPS(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).abs().flatten(1).mean(1) * 0 + torch.arange(1, x.shape[0] + 1, dtype=torch.float32)


def test_apr_loss_weights_and_reduction() -> None:
    pred = torch.zeros(2, 3, 4, 4, requires_grad=True)
    real = torch.ones(2, 3, 4, 4)
    loss, m = apr_loss(pred, real, _ConstLPIPS(), lpips_weight=0.5, l2_weight=2.0)
    assert loss.item() == pytest.approx(2.0 * 1.0 + 0.5 * 1.5)  # L2 = 1, mean LPIPS = 1.5
    assert set(m) == {"l2", "lpips"}
    per, _ = apr_loss(pred, real, _ConstLPIPS(), reduction="none")
    assert torch.allclose(per, torch.tensor([2.0, 3.0]))
    only_l2, m2 = apr_loss(pred, real, None)
    assert only_l2.item() == pytest.approx(1.0) and "lpips" not in m2
    loss.backward()
    assert torch.allclose(pred.grad, torch.full_like(pred, 2.0 * 2 * (0 - 1) / pred.numel()))


def test_apr_loss_with_random_lpips_has_input_gradient() -> None:
    from system.losses.lpips import LPIPS

    with pytest.warns(UserWarning):
        lp = LPIPS()
    pred = torch.rand(1, 3, 32, 32, requires_grad=True)
    loss, m = apr_loss(pred * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1, lp)
    loss.backward()
    assert m["lpips"].item() > 0 and pred.grad.abs().sum() > 0
