"""Smoke run of bench/train_overhead.py at its smallest setting (a width-8 GAN on 8 px images, 2
timed steps, 2 Ray Train workers): both sides print their rates, then the ratio and the load."""
import pytest

from bench_runner import figures, run_bench


@pytest.mark.slow
def test_train_overhead_prints_both_sides_the_ratio_and_the_load():
    out = run_bench("train_overhead", "--steps", "2", "--warmup", "1", "--global-batch", "4", "--width", "8",
                    "--resolution", "8")
    for side in ("plain PyTorch, 1 process x 1 thread(s)  :", "plain PyTorch, 1 process x 2 thread(s)  :",
                 "Ray Train + DeepSpeed ZeRO-2, 2 workers :"):
        steps_s, samples_s, samples_s_mean = figures(out, side, 3)
        assert steps_s > 0 and samples_s == pytest.approx(4 * steps_s, rel=0.01) and samples_s_mean > 0, side
    assert figures(out, "ratio (distributed / best plain, per sample):")[0] > 0
    assert len(figures(out, "load average 1/5/15 min: at start", 6)) == 6
