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


def test_reconstruction_of_a_llamagen_export(tmp_path):
    """Any tokenizer kind: a LlamaGen VQ export (no fixed image size: the AR model's grid sets it);
    a tokenizer without an AR model has no next-token accuracy (and a VQ alone no image size)."""
    import torch

    from system.models.artifacts import Artifact, save_export
    from system.models.gpt import GPT
    from system.models.registry import gpt_config
    from system.models.tokenizer1d import Tokenizer1D, tokenizer_config
    from system.models.vqgan import VQGANConfig, VQModel

    torch.manual_seed(0)
    vq = VQModel(VQGANConfig(codebook_size=64, codebook_dim=8, ch=32, ch_mult=(1, 2, 2, 2), z_channels=32, num_res_blocks=1))
    ar = GPT(gpt_config("debug-tiny", vocab_size=64, block_size=16, num_classes=8))  # 4x4 grid: 32 px
    shards = str(tmp_path / "val")
    cfg = EvaluateConfig(export_url=save_export(str(tmp_path / "pair"), {"tokenizer": Artifact.of("llamagen-vq", vq),
                                                                         "ar": Artifact.of("gpt", ar)}),
                         shards=shards, max_images=4, batch_size=4)
    rec = Evaluator(cfg, device="cpu").reconstruction(None)
    assert rec["num_images"] == 4 and rec["resolution"] == 32 and rec["codebook_size"] == 64
    assert 0 <= rec["ar_next_token_accuracy"] <= 1 and np.isfinite(rec["psnr"]) and "lpips" not in rec
    tok1d = Artifact.of("tokenizer1d", Tokenizer1D(tokenizer_config("debug-tiny")))
    alone = save_export(str(tmp_path / "tok1d"), {"tokenizer": tok1d})
    rec = Evaluator(EvaluateConfig(export_url=alone, shards=shards, max_images=4), device="cpu").reconstruction(None)
    assert rec["resolution"] == 32 and rec["ar_next_token_accuracy"] is None
    alone = save_export(str(tmp_path / "vq"), {"tokenizer": Artifact.of("llamagen-vq", vq)})
    with pytest.raises(ValueError, match="takes any image size"):
        Evaluator(EvaluateConfig(export_url=alone, shards=shards, max_images=4), device="cpu").reconstruction(None)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_held_out_accuracy_through_the_generator_protocol(bidirectional):
    """Next-token accuracy for a causal generator; for a masked one (bitwise head) the fraction of
    the seeded HELD_OUT_MASK_RATIO mask it predicts right, read through `masked` / `predict_masked`."""
    import torch

    from system.eval.suite import HELD_OUT_MASK_RATIO, held_out_accuracy
    from system.eval.token_metrics import next_token_accuracy
    from system.models.gpt import GPT, bits_to_index
    from system.models.registry import gpt_config
    from system.sampling.gpt_generator import GPTGenerator

    torch.manual_seed(0)
    kw = dict(vocab_size=2**6, head="bitwise", n_bits=6, bidirectional=True, rope="1d") if bidirectional else {}
    gen = GPTGenerator(GPT(gpt_config("debug-tiny", **kw)).eval())
    torch.nn.init.normal_(gen.ar.output.weight, std=0.5)
    codes, labels = torch.randint(0, 64, (4, 16)), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        acc = held_out_accuracy(gen, codes, labels)
        if not bidirectional:
            assert acc == next_token_accuracy(gen.ar(codes, labels), codes)
            return
        order = torch.rand(4, 16, generator=torch.Generator().manual_seed(0)).argsort(-1).argsort(-1)
        mask = order < round(HELD_OUT_MASK_RATIO * 16)
        pred = bits_to_index(gen.ar(codes, labels, token_mask=mask).argmax(-1))
    assert 0 <= acc <= 1 and acc == pytest.approx(float((pred == codes)[mask].double().mean()))
