import json

import numpy as np
import pytest

import evaluate  # jobs/evaluate.py (tests/jobs/conftest.py puts jobs/ on sys.path)
from system.config.eval_schema import SampleConfig
from system.eval.inception import RANDOM_WEIGHTS_LABEL
from system.eval.sample_parts import PartSampler, merge_parts
from system.eval.sampling_plan import SamplingPlan


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "nothing to evaluate"),
        (["samples=/x.npz", "lpips.vgg_path=/v.pth"], "lpips.lin_path"),
        (["samples=/x.npz", "is_splits=0"], "is_splits"),
        (["samples=/x.npz", "refrence=/r.npz"], "unknown config key 'refrence'"),
    ],
)
def test_config_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:") and message in err


def test_evaluate_end_to_end_on_the_embedded_default(tiny_export, tmp_path, monkeypatch, capsys):
    """Samples of a tiny export (2 classes x 4) and the export itself against the embedded photos."""
    monkeypatch.chdir(tmp_path)  # the embedded default shard set is built under ./.cache
    plan = SamplingPlan(num_per_class=4, num_classes=2, part_size=4, seed=0)
    sampler = PartSampler(SampleConfig(export_url=str(tiny_export), batch_size=4))
    for part in plan.parts():
        sampler.write_part(part, str(tmp_path / "samples"))
    npz = merge_parts(str(tmp_path / "samples"), plan)

    argv = [f"samples={npz}", f"export_url={tiny_export}", "max_images=8", "batch_size=8", "pr_k=3"]
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "samples/eval/report.json").read_text())  # default out: beside the npz
    assert (tmp_path / ".cache/embedded_shards/val/index.json").is_file()
    assert report["inception"] == {"label": RANDOM_WEIGHTS_LABEL, "pretrained": False}
    assert f"[{RANDOM_WEIGHTS_LABEL}]" in out and "WARNING" in out
    gen, rec = report["generation"], report["reconstruction"]
    assert gen["num_images"] == 8 and gen["num_classes"] == 2 and gen["reference_images"] == 8
    for key in ("fid", "inception_score", "precision", "recall"):
        assert np.isfinite(gen[key]), key
    assert gen["fid"] > 0 and 0 <= gen["precision"] <= 1
    assert rec["num_images"] == 8 and rec["resolution"] == 32 and rec["codebook_size"] == 64
    for key in ("rfid", "psnr", "ssim", "lpips", "codebook_usage", "codebook_perplexity", "ar_next_token_accuracy"):
        assert np.isfinite(rec[key]), key
    assert 0 < rec["codebook_usage"] <= 1 and 1 <= rec["codebook_perplexity"] <= 64
    assert report["lpips"]["pretrained"] is False and report["config"]["max_images"] == 8
    assert list((tmp_path / "samples/eval/wandb").glob("offline-run-*"))  # logged to wandb, offline
