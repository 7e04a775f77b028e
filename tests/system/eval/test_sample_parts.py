import numpy as np
import pytest
import torch
from PIL import Image

from system.data.storage import write_bytes_atomic
from system.eval.sample_parts import (
    claim_out,
    encode_part,
    finished_parts,
    merge_parts,
    part_url,
    read_part,
    to_uint8,
    write_grids,
)
from system.eval.sampling_plan import SamplingPlan


def _fake_part(part, res=16):
    rng = np.random.default_rng(part.index)
    return rng.integers(0, 256, (part.size, res, res, 3), dtype=np.uint8), rng.integers(0, 64, (part.size, 5)).astype(np.int16)


def _write_all(out, plan, skip=()):
    made = {}
    for part in plan.parts():
        images, codes = _fake_part(part)
        made[part.index] = (images, codes)
        if part.index not in skip:
            write_bytes_atomic(part_url(out, part.index), encode_part(part, images, codes))
    return made


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]
    assert to_uint8(x).shape == (1, 1, 5, 3)


def test_merge_streams_parts_in_order_and_grids(tmp_path):
    plan = SamplingPlan(num_per_class=3, num_classes=3, part_size=4, seed=0)
    out = str(tmp_path / "s")
    made = _write_all(out, plan)
    assert finished_parts(out, plan) == {0, 1, 2}
    url = merge_parts(out, plan)
    with np.load(url) as f:
        assert np.array_equal(f["arr_0"], np.concatenate([made[i][0] for i in range(3)]))
        assert np.array_equal(f["codes"], np.concatenate([made[i][1] for i in range(3)]))
        assert f["labels"].tolist() == [0, 1, 2] * 3
    grids = write_grids(out, plan, num_classes=2, cols=2)
    assert len(grids) == 1
    img = np.asarray(Image.open(grids[0]))
    # 2 class rows x 2 images of 16 px, padding 2, upscaled x6 (nearest) so small samples are viewable
    assert img.shape == (6 * (2 + 2 * 18), 6 * (2 + 2 * 18), 3)
    assert np.array_equal(img[12 : 12 + 96 : 6, 12 : 12 + 96 : 6], made[0][0][0])  # class 0's first image first


def test_missing_or_foreign_parts_are_errors(tmp_path):
    plan = SamplingPlan(2, 2, 2, seed=0)
    out = str(tmp_path / "s")
    _write_all(out, plan, skip=(1,))
    assert finished_parts(out, plan) == {0}
    with pytest.raises(FileNotFoundError, match="part_00001.npz is missing"):
        merge_parts(out, plan)
    other = SamplingPlan(2, 2, 2, seed=0).part(0)
    bad = SamplingPlan(1, 4, 2, seed=0).part(1)  # labels (2, 3), not (0, 1)
    write_bytes_atomic(part_url(out, 0), encode_part(bad, *_fake_part(bad)))
    with pytest.raises(ValueError, match="does not match part 0"):
        read_part(out, other)


def test_claim_out_refuses_other_settings(tmp_path):
    out = str(tmp_path / "s")
    rec = {"seed": 0, "cfg_scale": 2.0}
    claim_out(out, rec)
    claim_out(out, dict(rec))  # same settings: fine
    with pytest.raises(ValueError, match=r"cfg_scale: 2.0 -> 3.0.*delete"):
        claim_out(out, {**rec, "cfg_scale": 3.0})
