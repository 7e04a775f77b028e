"""The README's cluster walk-through runs as written: its make_shards and `ray job submit` command
lines are valid job configs, and the weight file names are the ones the GPU overlay mounts."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from system.config import EOSTokExperiment, MakeShardsConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Running on a cluster")
    return text[start:text.index("\n## ", start + 1)]


def command(prefix: str) -> list[str]:
    """The argv of the first shell command starting with `prefix` (continuation lines joined, comments
    dropped, $LABELS and BUCKET filled in)."""
    block = section().replace("\\\n", " ")
    (line,) = [ln for ln in block.splitlines() if ln.strip().startswith(prefix)][:1]
    line = line.split(" #", 1)[0].replace("$LABELS", "val_labels=/x/LOC_val_solution.csv").replace("BUCKET", "bucket")
    return shlex.split(line)


def test_make_shards_line_is_a_valid_config():
    argv = command("python jobs/make_shards.py")[2:]
    cfg = load_config(MakeShardsConfig, argv, ["make_shards.yaml"])
    assert cfg.out == "s3://bucket/imagenet" and cfg.val_labels.endswith("LOC_val_solution.csv")
    assert "val_synsets=" in section() and "ILSVRC2012_validation_ground_truth.txt" in section()


def test_ray_job_submit_shows_address_token_runtime_env_and_a_valid_job():
    argv = command("ray job submit")
    assert argv[argv.index("--address") + 1].startswith("http://") and "--runtime-env-json" in argv
    assert "RAY_AUTH_TOKEN=" in section()
    job = argv[argv.index("--") + 1:]
    assert job[:2] == ["python", "jobs/eostok_h.py"]
    from jobs.eostok_h import DEFAULTS

    cfg = load_config(EOSTokExperiment, job[2:], DEFAULTS)
    overlay = yaml.safe_load(yaml.safe_load((REPO / "infra/k8s/overlays/eostok-h-4x8/run-config.yaml").read_text())["data"]["run.yaml"])
    lpips = overlay["method"]["lpips_net"]
    assert cfg.method.lpips_net.lin_path == lpips["lin_path"] and cfg.method.lpips_net.vgg_path == lpips["vgg_path"]
    assert cfg.method.teacher.path == overlay["method"]["teacher"]["path"]
    for name in re.findall(r"s3://bucket/models/(\S+)", section().replace("BUCKET", "bucket")):
        assert f"/models/{name}" in (lpips["lin_path"], lpips["vgg_path"], overlay["method"]["teacher"]["path"]), name
