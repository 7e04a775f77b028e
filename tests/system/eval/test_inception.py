"""InceptionV3FID: public pytorch-fid key layout, strict loading, shapes, pre-processing."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from system.eval.inception import (
    RANDOM_WEIGHTS_LABEL,
    InceptionV3FID,
    _avg_pool_3x3,
    extract_features,
    resize_tf1,
)


def _expected_convs() -> dict[str, tuple[int, int, int, int]]:
    """BasicConv2d name -> conv weight shape (out, in, kh, kw), written from the public layout of
    pt_inception-2015-12-05 (torchvision Inception3 blocks, 1008 classes, no AuxLogits)."""
    convs = {
        "Conv2d_1a_3x3": (32, 3, 3, 3),
        "Conv2d_2a_3x3": (32, 32, 3, 3),
        "Conv2d_2b_3x3": (64, 32, 3, 3),
        "Conv2d_3b_1x1": (80, 64, 1, 1),
        "Conv2d_4a_3x3": (192, 80, 3, 3),
    }
    for name, cin, pf in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        convs.update({
            f"{name}.branch1x1": (64, cin, 1, 1),
            f"{name}.branch5x5_1": (48, cin, 1, 1),
            f"{name}.branch5x5_2": (64, 48, 5, 5),
            f"{name}.branch3x3dbl_1": (64, cin, 1, 1),
            f"{name}.branch3x3dbl_2": (96, 64, 3, 3),
            f"{name}.branch3x3dbl_3": (96, 96, 3, 3),
            f"{name}.branch_pool": (pf, cin, 1, 1),
        })
    convs.update({
        "Mixed_6a.branch3x3": (384, 288, 3, 3),
        "Mixed_6a.branch3x3dbl_1": (64, 288, 1, 1),
        "Mixed_6a.branch3x3dbl_2": (96, 64, 3, 3),
        "Mixed_6a.branch3x3dbl_3": (96, 96, 3, 3),
    })
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        convs.update({
            f"{name}.branch1x1": (192, 768, 1, 1),
            f"{name}.branch7x7_1": (c7, 768, 1, 1),
            f"{name}.branch7x7_2": (c7, c7, 1, 7),
            f"{name}.branch7x7_3": (192, c7, 7, 1),
            f"{name}.branch7x7dbl_1": (c7, 768, 1, 1),
            f"{name}.branch7x7dbl_2": (c7, c7, 7, 1),
            f"{name}.branch7x7dbl_3": (c7, c7, 1, 7),
            f"{name}.branch7x7dbl_4": (c7, c7, 7, 1),
            f"{name}.branch7x7dbl_5": (192, c7, 1, 7),
            f"{name}.branch_pool": (192, 768, 1, 1),
        })
    convs.update({
        "Mixed_7a.branch3x3_1": (192, 768, 1, 1),
        "Mixed_7a.branch3x3_2": (320, 192, 3, 3),
        "Mixed_7a.branch7x7x3_1": (192, 768, 1, 1),
        "Mixed_7a.branch7x7x3_2": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_3": (192, 192, 7, 1),
        "Mixed_7a.branch7x7x3_4": (192, 192, 3, 3),
    })
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        convs.update({
            f"{name}.branch1x1": (320, cin, 1, 1),
            f"{name}.branch3x3_1": (384, cin, 1, 1),
            f"{name}.branch3x3_2a": (384, 384, 1, 3),
            f"{name}.branch3x3_2b": (384, 384, 3, 1),
            f"{name}.branch3x3dbl_1": (448, cin, 1, 1),
            f"{name}.branch3x3dbl_2": (384, 448, 3, 3),
            f"{name}.branch3x3dbl_3a": (384, 384, 1, 3),
            f"{name}.branch3x3dbl_3b": (384, 384, 3, 1),
            f"{name}.branch_pool": (192, cin, 1, 1),
        })
    return convs


def expected_layout(with_num_batches: bool = True) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in _expected_convs().items():
        out[f"{name}.conv.weight"] = shape
        for p in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.bn.{p}"] = (shape[0],)
        if with_num_batches:
            out[f"{name}.bn.num_batches_tracked"] = ()
    out["fc.weight"] = (1008, 2048)
    out["fc.bias"] = (1008,)
    return out


def _quiet_model(**kw) -> InceptionV3FID:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return InceptionV3FID(**kw)


def test_state_dict_matches_public_layout_on_meta():
    with torch.device("meta"):
        model = _quiet_model()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = expected_layout()
    assert set(got) == set(want), (sorted(set(got) - set(want))[:5], sorted(set(want) - set(got))[:5])
    assert got == want
    assert not any(k.startswith("AuxLogits") for k in got)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 23_850_960  # torchvision Inception3 without aux head, 1008 classes


@pytest.fixture(scope="module")
def random_model() -> InceptionV3FID:
    torch.manual_seed(123)  # must not matter: random init is seeded internally
    return _quiet_model()


@pytest.mark.parametrize("with_num_batches", [True, False])
def test_public_layout_state_dict_loads_strict(tmp_path, with_num_batches):
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(s, generator=g) if s else torch.tensor(0)) for k, s in expected_layout(with_num_batches).items()}
    for k in sd:
        if k.endswith("running_var"):
            sd[k] = sd[k].abs() + 0.5
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, path)
    model = InceptionV3FID(str(path))
    assert model.pretrained and model.label != RANDOM_WEIGHTS_LABEL
    assert torch.equal(model.Mixed_7c.branch_pool.conv.weight, sd["Mixed_7c.branch_pool.conv.weight"])
    assert torch.equal(model.fc.bias, sd["fc.bias"])


def test_wrong_state_dict_is_rejected_with_hint(tmp_path):
    path = tmp_path / "torchvision.pth"
    torch.save({"AuxLogits.fc.weight": torch.zeros(1000, 768)}, path)
    with pytest.raises(RuntimeError, match="pytorch-fid"):
        InceptionV3FID(str(path))
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        InceptionV3FID(str(tmp_path / "missing.pth"))


def test_forward_shapes_labels_and_seeded_init(random_model):
    assert random_model.pretrained is False and random_model.label == RANDOM_WEIGHTS_LABEL
    assert not random_model.training and not any(p.requires_grad for p in random_model.parameters())
    img = np.random.default_rng(0).integers(0, 256, size=(1, 75, 75, 3), dtype=np.uint8)  # ADM NHWC uint8
    feats, logits = extract_features(random_model, img, batch_size=1)
    assert feats.shape == (1, 2048) and logits.shape == (1, 1008)
    assert np.isfinite(feats).all() and feats.std() > 0
    # logits are pool3 @ fc.weight^T (no bias), as in the IS reference code
    np.testing.assert_allclose(logits, feats @ random_model.fc.weight.double().numpy().T, rtol=1e-4, atol=1e-4)
    other = _quiet_model()  # a second random-weight network (another worker) is identical
    torch.testing.assert_close(other.Mixed_6e.branch7x7dbl_5.conv.weight, random_model.Mixed_6e.branch7x7dbl_5.conv.weight)
    with pytest.raises(ValueError, match="H, W, 3"):
        extract_features(random_model, img.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("preprocess", ["adm", "pytorch-fid"])
def test_uint8_input_equals_float_input(preprocess):
    with torch.device("meta"):
        model = _quiet_model(preprocess=preprocess)
    model = model.to_empty(device="cpu")
    u8 = torch.randint(0, 256, (1, 3, 75, 75), dtype=torch.uint8)
    a, b = model._prepare(u8), model._prepare(u8.float() / 255.0)
    assert a.shape == (1, 3, 299, 299)
    torch.testing.assert_close(a, b)
    assert -1.01 <= float(a.min()) and float(a.max()) <= 1.0


def test_fid_specific_blocks():
    ones = torch.ones(1, 2, 5, 5)
    torch.testing.assert_close(_avg_pool_3x3(ones), ones)  # padded zeros are not averaged in
    with torch.device("meta"):
        model = _quiet_model()
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"


def test_resize_tf1_uses_legacy_sampling():
    x = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2).expand(1, 1, 2, 2)
    out = resize_tf1(x, size=4)
    # TF1 resize_bilinear(align_corners=False): src = dst * in/out, no half-pixel shift; edge clamps
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 0.5, 1.0, 1.0]))
    y = torch.rand(1, 3, 299, 299)
    assert resize_tf1(y) is y
