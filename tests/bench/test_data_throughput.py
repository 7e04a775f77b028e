"""Smoke run of bench/data_throughput.py at its smallest setting (a few tiny JPEGs, local shards and a
moto S3 endpoint): every source prints its rates and the goal line its ratio."""
from bench_runner import figures, run_bench

ROWS = ("plain PIL loop (local files)", "shards, local disk, prefetch", "shards, S3 (moto), no prefetch",
        "shards, S3 (moto), prefetch", "S3 +1 ms, no prefetch", "S3 +1 ms, prefetch")


def test_data_throughput_prints_every_source():
    out = run_bench("data_throughput", "--images", "16", "--short-side", "48", "--resolution", "32", "--batch", "8",
                    "--shard-size", "8", "--chunk-size", "4", "--repeats", "1", "--latency-ms", "1")
    for row in ROWS:
        per_rank, per_cpu_s, vs_plain = figures(out, row, 3)
        assert per_rank > 0 and per_cpu_s > 0 and vs_plain > 0, row
    assert figures(out, "plain PIL loop (local files)", 3)[2] == 1.0
    s3, plain = figures(out, "S3 with prefetch:", 1)[0], figures(out, "vs plain local loop:", 1)[0]
    assert s3 > 0 and plain > 0 and "(goal >= 0.9x" in out
