"""AR next-token accuracy and the re-exported codebook metrics."""
from __future__ import annotations

import math

import pytest
import torch

import system.eval as ev
from system.eval.token_metrics import next_token_accuracy


def test_next_token_accuracy_hand_case():
    logits = torch.tensor([[[5.0, 1.0, 0.0], [0.0, 2.0, 3.0], [1.0, 0.0, 4.0], [0.0, 9.0, 1.0]]])  # (1, 4, 3)
    targets = torch.tensor([[0, 1, 2, 0]])
    assert next_token_accuracy(logits, targets) == pytest.approx(0.5)  # positions 0 and 2 right
    assert next_token_accuracy(logits, targets, top_k=2) == pytest.approx(0.75)  # position 1 in top-2
    ignored = torch.tensor([[0, -100, 2, -100]])
    assert next_token_accuracy(logits, ignored) == 1.0
    assert math.isnan(next_token_accuracy(logits, torch.full((1, 4), -100)))
    with pytest.raises(ValueError, match="disagree"):
        next_token_accuracy(logits, targets[:, :3])


def test_codebook_metrics_are_reexported():
    codes = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    assert ev.codebook_usage(codes, 8) == pytest.approx(0.5)
    assert ev.codebook_perplexity(codes, 8) == pytest.approx(4.0)
