"""RoPE tables: shapes, layouts, relative-position property, LlamaGen-style 2D split."""
from __future__ import annotations

import pytest
import torch

from system.models.rope import apply_rope, build_rope, rope_1d, rope_2d, rope_mixed


def test_1d_relative_property():
    d = 16
    table = rope_1d(20, d)
    assert table.shape == (20, d // 2, 2)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, d, generator=g), torch.randn(1, 1, 1, d, generator=g)
    def score(i, j):
        return (apply_rope(q, table[i : i + 1]) * apply_rope(k, table[j : j + 1])).sum()
    torch.testing.assert_close(score(3, 1), score(12, 10), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_rotation_preserves_norm():
    x = torch.randn(2, 3, 10, 8)
    y = apply_rope(x, rope_1d(10, 8))
    torch.testing.assert_close(x.norm(dim=-1), y.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_2d_axes_split():
    d, g = 16, 4
    t = rope_2d(g, d)
    assert t.shape == (g * g, d // 2, 2)
    # token (r, c) = index r*g + c; first half pairs follow rows, second half columns
    r1c0, r1c3 = t[1 * g + 0], t[1 * g + 3]
    torch.testing.assert_close(r1c0[: d // 4], r1c3[: d // 4])
    assert not torch.allclose(r1c0[d // 4 :], r1c3[d // 4 :])
    # half-dim 1D table at the row index equals the row half
    torch.testing.assert_close(t[2 * g + 1, : d // 4], rope_1d(3, d // 2)[2])


def test_mixed_layout():
    d, n_cls, k, g = 16, 1, 4, 3
    t = rope_mixed(d, n_cls, k, g)
    assert t.shape == (n_cls + k + g * g, d // 2, 2)
    assert torch.all(t[:n_cls] == 0)
    torch.testing.assert_close(t[n_cls : n_cls + k], rope_1d(k, d))
    torch.testing.assert_close(t[n_cls + k :], rope_2d(g, d, offset=k))
    ident = rope_mixed(d, n_cls, k, g, cls_fill="identity")
    assert torch.all(ident[:n_cls, :, 0] == 1) and torch.all(ident[:n_cls, :, 1] == 0)


def test_build_rope_layouts_and_errors():
    assert build_rope("2d", 16, 1, 0, 4).shape == (17, 8, 2)
    assert build_rope("1d", 16, 1, 3, 4).shape == (20, 8, 2)
    with pytest.raises(ValueError, match="prefix"):
        build_rope("2d", 16, 1, 3, 4)
    with pytest.raises(ValueError, match="unknown rope layout"):
        build_rope("3d", 16, 1, 0, 4)
    with pytest.raises(ValueError, match="does not fit"):
        apply_rope(torch.randn(1, 1, 5, 16), rope_1d(4, 16))
