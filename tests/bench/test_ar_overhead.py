"""Smoke run of bench/ar_overhead.py at its smallest setting (a 1-layer GPT on 8-token sequences,
2 timed steps, 2 Ray Train workers) reading a token shard set on both sides: both sides print
their rates, then the ratio and the load."""
import pytest

from bench_runner import figures, run_bench


@pytest.mark.slow
def test_ar_overhead_from_token_shards_prints_both_sides_the_ratio_and_the_load():
    out = run_bench("ar_overhead", "--steps", "2", "--warmup", "1", "--global-batch", "4", "--seq-len", "8", "--vocab", "64",
                    "--layers", "1", "--dim", "32", "--heads", "2", "--data", "shards")
    assert "data from shards" in out
    for side in ("plain PyTorch, 1 process x 1 thread(s)  :", "plain PyTorch, 1 process x 2 thread(s)  :",
                 "Ray Train + DeepSpeed ZeRO-2, 2 workers :"):
        steps_s, tokens_s, tokens_s_mean = figures(out, side, 3)
        assert steps_s > 0 and tokens_s == pytest.approx(4 * 8 * steps_s, rel=0.01) and tokens_s_mean > 0, side
    assert figures(out, "ratio (distributed / best plain, per token):")[0] > 0
    assert len(figures(out, "load average 1/5/15 min: at start", 6)) == 6
