import io

import numpy as np
import pytest
import torch
from PIL import Image

from system.data.transforms import center_crop_arr, decode_rgb, flip_decision, preprocess, to_tensor


def _img(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_center_crop_matches_adm_recipe():
    img = _img(600, 400)
    out = center_crop_arr(img, 128)
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8
    # by hand: one BOX halving (400 >= 256) -> 300x200, BICUBIC to short side 128 -> 192x128, center crop
    ref = img.resize((300, 200), Image.BOX).resize((192, 128), Image.BICUBIC)
    ref = np.asarray(ref)[:, 32:160]
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("size", [(50, 90), (256, 256), (1000, 300)])
def test_center_crop_any_shape(size):
    assert center_crop_arr(_img(*size), 64).shape == (64, 64, 3)


def test_flip_is_deterministic_and_balanced():
    keys = [f"k{i}" for i in range(400)]
    a = [flip_decision(3, 1, k) for k in keys]
    assert a == [flip_decision(3, 1, k) for k in keys]
    assert 150 < sum(a) < 250
    assert a != [flip_decision(3, 2, k) for k in keys]  # a new epoch flips other images


def test_preprocess_flip_and_tensor_range():
    buf = io.BytesIO()
    _img(80, 60).convert("L").save(buf, format="JPEG")  # greyscale input becomes RGB
    plain, flipped = preprocess(buf.getvalue(), 32, False), preprocess(buf.getvalue(), 32, True)
    np.testing.assert_array_equal(plain[:, ::-1], flipped)
    t = to_tensor([plain, flipped])
    assert t.shape == (2, 3, 32, 32) and t.dtype == torch.float32
    assert -1.0 <= t.min() and t.max() <= 1.0
    assert torch.allclose(t[0, :, 0, 0], torch.tensor(plain[0, 0]).float() / 127.5 - 1)


def test_decode_rejects_corrupt_bytes():
    buf = io.BytesIO()
    _img(64, 64).save(buf, format="JPEG")
    with pytest.raises(Exception):
        decode_rgb(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(Exception):
        decode_rgb(b"not an image")


def test_ten_crop_is_llamagens_tencrop_of_the_1_1x_center_crop():
    from system.data.transforms import augment_views, ten_crop_views

    img = _img(100, 80, seed=3)
    big = center_crop_arr(img, 35)  # int(32 * 1.1)
    # torchvision TenCrop(32) on 35 px: corners, then the centre at round(1.5) = 2, then all five of the mirror
    boxes = [(0, 0), (0, 3), (3, 0), (3, 3), (2, 2)]
    want = [big[y : y + 32, x : x + 32] for y, x in boxes] + [big[:, ::-1][y : y + 32, x : x + 32] for y, x in boxes]
    got = ten_crop_views(img, 32)
    assert len(got) == 10 and all(np.array_equal(g, w) for g, w in zip(got, want))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    views = {m: augment_views(buf.getvalue(), 32, m) for m in ("none", "flip", "ten-crop")}
    assert {m: v.shape for m, v in views.items()} == {"none": (1, 32, 32, 3), "flip": (2, 32, 32, 3),
                                                       "ten-crop": (10, 32, 32, 3)}
    assert np.array_equal(views["flip"][0], views["none"][0]) and np.array_equal(views["flip"][1], views["none"][0][:, ::-1])
    with pytest.raises(ValueError, match="ten-crop"):
        augment_views(buf.getvalue(), 32, "mirror")
