"""`pip install .` (not editable) is enough to run a job: the wheel carries system/, cluster/, jobs/
and the configs the jobs read; its metadata states what the code needs (Python, Ray, extras)."""
from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "system", "cluster", "jobs", "configs")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` builds, from a copy of the sources (no build/ left in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    (whl,) = out.glob("tokenizer_ar-*.whl")
    return whl


def metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(z.read(name))


def test_metadata_states_what_the_code_needs(wheel):
    meta = metadata(wheel)
    python = SpecifierSet(meta["Requires-Python"])
    assert "3.10" not in python and "3.11" in python, "the pinned numpy/pandas/scipy/... need Python 3.11"
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    core = {r.name: r for r in reqs if r.marker is None}
    assert "transformers" in core, "the main job's teacher (DINOv2) needs transformers"
    assert "diffusers" not in core, "diffusers is SemTok's extra only"
    assert any(r.name == "diffusers" and r.marker.evaluate({"extra": "semtok"}) for r in reqs)
    assert "2.57.1" not in core["ray"].specifier and "2.58.0" in core["ray"].specifier, \
        "ray.train.get_preemption_info first appears in Ray 2.58.0"


def test_an_installed_wheel_runs_a_job_with_its_configs(wheel, tmp_path):
    """Installed with --no-deps into a folder of its own (the dependencies come from this
    environment) and run from outside the checkout: the job finds its default configs and a
    `--config configs/...` path, which resolves to the installed copy."""
    site = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                          str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (site / "configs" / "experiments" / "eostok_tiny.yaml").is_file()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    probe = ("import system, jobs.eostok_h as job; from system.config import load_config; "
             "from system.config.load import CONFIG_DIR; "
             "cfg = load_config(job.EOSTokExperiment, ['--config', 'configs/experiments/eostok_tiny.yaml'], job.DEFAULTS); "
             "print(system.__file__); print(CONFIG_DIR); print(cfg.run_name)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    module, config_dir, run_name = out.stdout.split()[-3:]
    assert module.startswith(str(site)) and config_dir == str(site / "configs") and run_name == "eostok-tiny"
    helped = subprocess.run([sys.executable, "-m", "jobs.eostok_h", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0 and "data.url" in helped.stdout, helped.stderr
