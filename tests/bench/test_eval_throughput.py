"""Smoke run of bench/eval_throughput.py at its smallest setting (one Inception image, 16-d FID
features): the extraction rate and every FID path's time and value are printed, the paths agree."""
import json

from bench_runner import figures, run_bench


def test_eval_throughput_prints_inception_rate_and_fid_paths(tmp_path):
    out = run_bench("eval_throughput", "--batch", "1", "--iters", "1", "--image-size", "32", "--num-features", "64",
                    "--feature-dim", "16", "--json", str(tmp_path / "r.json"))
    assert figures(out, "Inception feature extraction (random weights):")[0] > 0
    for path in ("frechet_distance [scipy, cpu]", "frechet_distance [torch, cpu]"):
        seconds, fid = figures(out, path, 2)
        assert seconds >= 0 and fid > 0, path
    assert figures(out, "max |FID difference| between paths:")[0] < 1e-6
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["inception_images_per_s"] > 0 and len(report["fid"]) == 3
