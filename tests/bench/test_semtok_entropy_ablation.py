"""Smoke run of bench/semtok_entropy_ablation.py at its smallest setting (the tiny VAE fitted for 2
steps, then 2 stage I steps per variant: three tiny pipeline runs, local Ray): the table prints
every code statistic for the entropy loss off and on, and the JSON beside it holds them."""
import json

import pytest

from bench_runner import figures, run_bench

ROWS = ("images", "tokens", "bit usage [0.1, 0.9]", "code perplexity", "distinct codes", "mean bit entropy (bits)")


@pytest.mark.slow
def test_semtok_entropy_ablation_prints_off_and_on(tmp_path):
    out = run_bench("semtok_entropy_ablation", "--steps", "2", "--vae-steps", "2", "--storage", str(tmp_path), timeout=900)
    for row in ROWS:
        off, on = figures(out, row, 2)
        assert off >= 0 and on >= 0, row
    assert figures(out, "images", 2)[0] > 0 and "val PSNR (flow, dB)" in out
    res = json.loads((tmp_path / "semtok_entropy_ablation_q0.0025_g1_s0.json").read_text())
    assert set(res) == {"off", "on"} and set(ROWS) <= set(res["on"])
