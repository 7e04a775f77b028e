import numpy as np
import pytest

from system.eval.sampling_plan import SamplingPlan, fingerprint, part_seed, record_mismatch


def test_parts_cover_every_image_once_with_interleaved_labels():
    plan = SamplingPlan(num_per_class=5, num_classes=3, part_size=4, seed=7)
    parts = plan.parts()
    assert plan.total == 15 and plan.num_parts == 4 == len(parts)
    assert [p.size for p in parts] == [4, 4, 4, 3]
    assert [p.start for p in parts] == [0, 4, 8, 12]
    labels = np.concatenate([p.labels for p in parts])
    assert labels.tolist() == plan.labels().tolist() == [i % 3 for i in range(15)]
    assert np.bincount(labels).tolist() == [5, 5, 5]


def test_part_depends_only_on_seed_and_index():
    a = SamplingPlan(50, 1000, 64, seed=3)
    b = SamplingPlan(50, 1000, 64, seed=3)
    assert a.part(17) == b.part(17)
    seeds = [p.seed for p in a.parts()]
    assert len(set(seeds)) == len(seeds)  # every part its own stream
    assert SamplingPlan(50, 1000, 64, seed=4).part(17).seed != a.part(17).seed
    assert part_seed(3, 17) == a.part(17).seed and 0 <= part_seed(3, 17) < 2**63


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="part_size"):
        SamplingPlan(1, 1, 0)
    with pytest.raises(IndexError, match="has 2 parts"):
        SamplingPlan(2, 2, 2).part(2)
    with pytest.raises(ValueError, match="seed"):
        part_seed(-1, 0)


def test_fingerprint_and_mismatch():
    r = {"seed": 0, "cfg_scale": 2.0}
    assert fingerprint(r) == fingerprint(dict(reversed(r.items())))
    assert fingerprint(r) != fingerprint({**r, "seed": 1})
    assert record_mismatch(r, {**r, "seed": 1}) == ["seed: 0 -> 1"]
    assert record_mismatch(r, r) == []
