"""Smoke run of bench/sampling.py at its smallest setting (the debug-tiny GPT, batch 2, one
thread): both decode paths print their time and rate, and the speed-up between them."""
from bench_runner import figures, run_bench


def test_sampling_prints_both_paths_and_the_speedup():
    out = run_bench("sampling", "--model", "debug-tiny", "--batch", "2", "--threads", "1")
    for path in ("kv-cache :", "recompute:"):
        seconds, img_s = figures(out, path, 2)
        assert seconds > 0 and img_s > 0, path
    assert figures(out, "speed-up :")[0] > 0
