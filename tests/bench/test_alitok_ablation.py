"""Smoke run of bench/alitok_ablation.py at its smallest setting (2 tokenizer + 2 AR steps per
variant: two tiny pipelines, local Ray): the table prints every figure for both decoders and the
JSON beside it holds them."""
import json

import pytest

from bench_runner import figures, run_bench

ROWS = ("held-out next-token acc", "AR train acc (last log)", "probe acc (stage 1, last log)", "val PSNR (dB)",
        "val SSIM", "val code usage", "val code perplexity")


@pytest.mark.slow
def test_alitok_ablation_prints_both_variants(tmp_path):
    out = run_bench("alitok_ablation", "--steps", "2", "--ar-steps", "2", "--storage", str(tmp_path), timeout=900)
    assert "bidirectional (A)" in out and "causal (B)" in out
    for row in ROWS:
        assert len(figures(out, row, 2)) == 2, row
    assert 0 <= figures(out, "held-out next-token acc", 2)[1] <= 1 and figures(out, "val PSNR (dB)", 2)[0] > 0
    res = json.loads((tmp_path / "alitok_ablation_s0.json").read_text())
    assert set(res) == {"bidirectional", "causal"} and set(res["causal"]) == set(ROWS)
