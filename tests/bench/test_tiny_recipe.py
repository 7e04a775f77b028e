"""Smoke run of bench/tiny_recipe.py at its smallest setting (the demo preset for 2 steps): the
preset's row prints every figure."""
from bench_runner import figures, run_bench


def test_tiny_recipe_prints_the_preset_row():
    out = run_bench("tiny_recipe", "--steps", "2")
    steps, steps_s, psnr, psnr_ema, ssim, usage, acc, *curve = figures(out, "preset ", 9)
    assert steps == 2 and steps_s > 0 and psnr > 0 and psnr_ema > 0 and -1 <= ssim <= 1 and 0 < usage <= 1
    assert 0 <= acc <= 1 and len(curve) == 2 and all(c > 0 for c in curve)
