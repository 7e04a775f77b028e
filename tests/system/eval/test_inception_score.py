"""Inception Score on hand-made logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from system.eval.inception_score import inception_score


def test_uniform_predictions_give_one():
    mean, std = inception_score(np.zeros((40, 1008)), splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_confident_distinct_classes_give_num_classes():
    logits = 60.0 * torch.eye(10).repeat(2, 1)  # 20 samples, each split holds all 10 classes once
    mean, std = inception_score(logits, splits=2)
    assert mean == pytest.approx(10.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    # every sample the same confident class: no diversity -> 1
    same = torch.zeros(10, 5)
    same[:, 3] = 60.0
    assert inception_score(same, splits=1)[0] == pytest.approx(1.0, abs=1e-9)


def test_two_balanced_classes_with_partial_confidence():
    # p(y|x) = (0.75, 0.25) or (0.25, 0.75), balanced: IS = exp(log 2 - H(0.75))
    logit = np.log(3.0)
    logits = np.array([[logit, 0.0], [0.0, logit]] * 5)
    h = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert inception_score(logits, splits=1)[0] == pytest.approx(np.exp(np.log(2) - h), rel=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.zeros((5, 3)), splits=10)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        inception_score(np.zeros(5))
