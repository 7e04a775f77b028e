"""bench/gpu.py: the --tiny run (CPU, seconds) prints a number for every section, a failing section
does not stop the others, the roofline arithmetic matches REFERENCE.md, and the bucketed decode
step it times samples exactly what generate() samples. The full run is a GPU-marked test."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.gpu import SECTIONS, generation_bytes  # noqa: E402
from system.models.gpt import GPT  # noqa: E402
from system.models.registry import gpt_config  # noqa: E402
from system.sampling.ar import BucketedDecoder, generate  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: these models are tiny, and a shared machine makes more threads slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench/gpu.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _numbers(report: dict, section: str) -> list[float]:
    rows = report[section] if isinstance(report[section], list) else [report[section]]
    return [v for r in rows for v in r.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def test_tiny_run_prints_a_number_for_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _run("--tiny", "--device", "cpu", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {} and report["device"].startswith("CPU")
    for section in SECTIONS:
        assert _numbers(report, section), section
    assert all(r["img_s"] > 0 and 0 < r["roofline_frac"] for r in report["sampling"])
    assert {r["decode"] for r in report["sampling"]} == {"bucketed", "eager"}
    assert 0 < report["training"]["mfu"] and report["training"]["tokens_per_s"] > 0
    assert all(r["max_abs_err_vs_math"] < 1e-5 for r in report["attention"])
    assert all(r["abs_err"] < 1e-6 for r in report["fid"])
    summary = proc.stdout[proc.stdout.index("== summary"):]
    for section in SECTIONS:
        assert f"\n{section} " in summary, section


def test_a_failing_section_does_not_stop_the_others(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _run("--tiny", "--device", "cpu", "--sections", "sampling,fid", "--models", "no-such-model", "--json", str(out))
    assert proc.returncode == 1
    assert "[sampling] FAILED" in proc.stdout and "failed sections: sampling" in proc.stdout
    report = json.loads(out.read_text())
    assert "no-such-model" in report["errors"]["sampling"] and _numbers(report, "fid")


def test_a_decode_mode_that_cannot_run_falls_back_and_says_why(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _run("--tiny", "--device", "cpu", "--sections", "sampling", "--models", "llamagen-tiny", "--batches", "2,3",
                "--decode", "graph", "--no-baseline", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "graph b=2: failed (" in proc.stdout and "falling back to bucketed" in proc.stdout
    assert "graph b=3: failed" not in proc.stdout  # the fallback is remembered for the next batch
    rows = json.loads(out.read_text())["sampling"]
    assert [(r["decode"], r["requested"]) for r in rows] == [("bucketed", "graph")] * 2


def test_roofline_matches_reference_figures():
    """REFERENCE.md: alitok-l, bf16, CFG, 4.3 TB/s -> ~545 img/s at batch 256, ~435 at batch 64."""
    cfg = gpt_config("alitok-l")

    def img_s(batch, bucket=None):
        return batch / (generation_bytes(cfg, 2 * batch, cfg.seq_len, 2, bucket) / 4.3e12)

    assert img_s(256) == pytest.approx(545, rel=0.03) and img_s(64) == pytest.approx(435, rel=0.03)
    # the whole static cache read every step caps decode_one near half of it; buckets of 32 near 90%
    assert img_s(256, 0) / img_s(256) < 0.55 < 0.85 < img_s(256, 32) / img_s(256) < 1


def _tiny_model(**kw):
    torch.manual_seed(0)
    m = GPT(gpt_config("debug-tiny", rope="mixed", prefix_tokens=4, qk_norm=True, qkv_bias=True, **kw))
    torch.nn.init.normal_(m.output.weight, std=0.5)  # sharp, non-trivial logits
    return m.eval()


@pytest.mark.parametrize("bucket", [0, 1, 4])
def test_bucketed_decoder_samples_what_generate_samples(bucket):
    m = _tiny_model()
    dec = BucketedDecoder(m, bucket=bucket)
    for batch in (3, 3, 2):  # the second generation reuses the kept cache, the third re-allocates it
        labels = torch.arange(batch)
        for kw in (dict(temperature=0.0, cfg_scale=3.0), dict(temperature=1.0, top_k=20, seed=1, cfg_scale=2.0)):
            assert torch.equal(generate(m, labels, **kw, decode_fn=dec), generate(m, labels, **kw))
    assert m._caches is None


def test_bucketed_decoder_compiles_once_for_all_buckets_and_batches():
    m = _tiny_model(n_layer=1)
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    dec = BucketedDecoder(m, bucket=4, compile_mode="default")
    dec._compiled = torch.compile(m.decode_one, backend=count, fullgraph=True)  # counting backend, no inductor
    for batch in (3, 3, 5):
        labels = torch.arange(batch)
        assert torch.equal(generate(m, labels, cfg_scale=3.0, temperature=0.0, decode_fn=dec),
                           generate(m, labels, cfg_scale=3.0, temperature=0.0))
    assert len(graphs) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("compile_mode", [None, "default"])
def test_cuda_graph_decoder_samples_what_generate_samples(compile_mode):
    m = _tiny_model().cuda()
    dec = BucketedDecoder(m, bucket=4, compile_mode=compile_mode, cuda_graph=True)
    for batch in (3, 3, 2):  # graphs replayed in the second generation, captured again in the third
        labels = torch.arange(batch, device="cuda")
        kw = dict(temperature=0.0, cfg_scale=3.0)
        assert torch.equal(generate(m, labels, **kw, decode_fn=dec), generate(m, labels, **kw))
    assert len(dec.graphs) == 5  # 1 class + 20 tokens: views of 4, 8, ..., 20 positions


@pytest.mark.gpu
def test_full_gpu_run_within_budget(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _run("--json", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {} and report["dtype"] == "bfloat16"
    for section in SECTIONS:
        assert _numbers(report, section), section
    assert {(r["model"], r["batch"]) for r in report["sampling"]} >= {
        (m, b) for m in ("alitok-l", "llamagen-l") for b in (64, 256)}
    assert report["total_s"] < 480, f"took {report['total_s']:.0f} s, budget 8 min"
