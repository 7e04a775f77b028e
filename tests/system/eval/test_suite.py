import numpy as np
import pytest

from system.config.eval_schema import EvaluateConfig
from system.eval.fid import feature_stats, frechet_distance
from system.eval.fid import fid_from_features as fid_features
from system.eval.suite import Evaluator, sample_images


def test_fid_features_matches_the_sqrtm_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 32))
    b = rng.normal(0.3, 1.5, size=(12, 32))
    ref = frechet_distance(*feature_stats(a), *feature_stats(b), backend="scipy")
    assert fid_features(a, b) == pytest.approx(ref, rel=1e-6, abs=1e-6)
    assert fid_features(a, a) == pytest.approx(0.0, abs=1e-8)
    big = rng.normal(size=(40, 8))  # N > D: falls back to the statistics path
    assert fid_features(big, big[::-1] + 1.0) == pytest.approx(8.0, rel=1e-6)


def test_sample_npz_checks(tmp_path):
    np.savez(tmp_path / "ok.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8), labels=np.arange(3))
    images, labels = sample_images(str(tmp_path / "ok.npz"))
    assert images.shape == (3, 8, 8, 3) and labels.tolist() == [0, 1, 2]
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((3, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        sample_images(str(tmp_path / "float.npz"))
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        sample_images(str(tmp_path / "missing.npz"))


def test_stats_only_reference_needs_the_real_inception(tmp_path):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    ev = Evaluator(EvaluateConfig(samples="x.npz", reference=str(tmp_path / "ref.npz")), device="cpu")
    with pytest.raises(ValueError, match="inception_path"):
        ev.reference(32)
