"""The tested set (infra/constraints.txt) and who installs it (infra/setup.sh for CI, the image),
and the helper scripts the Kubernetes manifests run (check_weights.py, load_weights.py)."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.version import Version

from kustomize_lite import render

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"infra_{name}", INFRA / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


check_image = load("check_image")
check_weights = load("check_weights")
load_weights = load("load_weights")


# --- the tested set ------------------------------------------------------------------------------

def test_constraints_pin_the_versions_the_code_needs():
    common, gpu = check_image.read_pins()
    assert Version(common["torch"]) >= Version("2.6"), "DataLoader(in_order=...) needs torch >= 2.6"
    assert "+" not in common["torch"], "torch is pinned without a local label (CPU here, CUDA in the image)"
    assert Version(common["deepspeed"]) >= Version("0.17.2"), "torch_autocast needs deepspeed >= 0.17.2"
    assert "ray" in common and "flash-attn" in gpu and "setuptools" in common
    for name in ("jsonschema", "jsonpatch", "pyyaml"):  # what these tests import
        assert name in common
    names = [re.split(r"[=<>]", line)[0].lower() for line in (INFRA / "constraints.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(names) == len(set(names)), "a package is pinned twice"


def test_this_environment_is_the_tested_set():
    """CI installs with the constraints (infra/setup.sh), so what runs the tests is what the image
    ships; a drift here means the lock or the environment is stale (python infra/lock.py)."""
    assert check_image.problems(gpu=False) == []


def test_check_image_reports_a_drift(tmp_path):
    common, gpu = check_image.read_pins()
    text = (INFRA / "constraints.txt").read_text().replace(f"ray=={common['ray']}", "ray==0.0.1")
    (tmp_path / "c.txt").write_text(text)
    assert check_image.problems(gpu=False, path=tmp_path / "c.txt") == ["ray: installed %s, constraints pin 0.0.1" % common["ray"]]
    assert check_image.main(["--constraints", str(tmp_path / "c.txt")]) == 1


def test_setup_installs_with_the_constraints():
    text = (INFRA / "setup.sh").read_text()
    assert subprocess.run(["bash", "-n", str(INFRA / "setup.sh")]).returncode == 0
    installs = [line for line in text.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert installs
    for line in installs:
        assert '-c "$PINS"' in line, f"infra/setup.sh installs without the constraints: {line.strip()}"
    assert "infra/constraints.txt" in text


def dockerfile() -> str:
    return (INFRA / "Dockerfile").read_text()


def test_image_base_has_the_pinned_torch_and_cuda_build_tools():
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", dockerfile(), re.M)
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn\d+-devel(@sha256:[0-9a-f]{64})?", base)
    assert m, f"base image {base}: expected pytorch/pytorch:<torch>-cuda<x.y>-cudnn<n>-devel (devel: nvcc for flash-attn)"
    common, _ = check_image.read_pins()
    assert m.group(1) == common["torch"], f"the base's torch {m.group(1)} is not the pinned {common['torch']}"


def test_image_installs_the_tested_set_as_a_non_root_user():
    text = dockerfile()
    runs = re.sub(r"\\\n", " ", text)
    pip_installs = [seg for line in runs.splitlines() for seg in line.split(";") if "pip install" in seg]
    assert pip_installs
    for seg in pip_installs:
        assert "-c infra/constraints.txt" in seg, f"an unpinned pip install in the image: {seg.strip()}"
    (fa,) = [seg for seg in pip_installs if "flash-attn" in seg]
    assert "--no-build-isolation" in fa, "flash-attn must build against the installed torch"
    assert "check_image.py --gpu" in text, "the build verifies the tested set"
    assert re.search(r"useradd --uid 1000 --gid 1000 --create-home --home-dir (\S+)", text)
    assert "chown -R 1000:1000 /app" in text and "ENV HOME=/home/ray" in text
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] in ("1000", "1000:1000", "ray"), "the image must end as the non-root user"
    assert "COPY infra ./infra" in text, "the RayJob entrypoint runs infra/check_weights.py from the image"


# --- manifests: no stale files, the PVC the overlays mount -----------------------------------------

def test_every_manifest_is_part_of_a_kustomization():
    used: set[Path] = set()

    def walk(folder: Path):
        k = yaml.safe_load((folder / "kustomization.yaml").read_text())
        used.add((folder / "kustomization.yaml").resolve())
        for r in k.get("resources", []):
            p = (folder / r).resolve()
            walk(p) if p.is_dir() else used.add(p)
        for patch in k.get("patches", []):
            if "path" in patch:
                used.add((folder / patch["path"]).resolve())

    for folder in [*(K8S / "overlays").iterdir(), K8S / "weights"]:
        walk(folder)
    stray = [str(p.relative_to(K8S)) for p in K8S.rglob("*.yaml")
             if p.resolve() not in used and p.parent.name != "schemas" and p.name != "secrets.example.yaml"]
    assert not stray, f"manifests no kustomization renders (stale?): {stray}"


def test_overlays_mount_the_claim_the_weights_kustomization_creates():
    claims = {d["metadata"]["name"] for d in render(K8S / "weights") if d["kind"] == "PersistentVolumeClaim"}
    for overlay in (K8S / "overlays").iterdir():
        for d in render(overlay):
            text = yaml.safe_dump(d)
            for claim in re.findall(r"claimName: (\S+)", text):
                assert claim in claims, f"{overlay.name} mounts PVC {claim!r}, infra/k8s/weights creates {sorted(claims)}"


# --- check_weights.py ----------------------------------------------------------------------------

@pytest.fixture
def weights(tmp_path):
    root = tmp_path / "models"
    (root / "dinov2-base").mkdir(parents=True)
    (root / "dinov2-base" / "config.json").write_text("{}")
    (root / "vgg16.pth").write_bytes(b"x" * 10)
    (root / "empty").mkdir()
    (root / "zero.pth").write_bytes(b"")
    return root


def test_check_weights_passes_when_every_path_is_there(weights, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"method": {"teacher": {"path": f"{weights}/dinov2-base"}},
                                   "data": {"url": "s3://b/train"}}))
    argv = ["--root", str(weights), "--no-exec", "--", "python", "job.py", "--config", str(cfg),
            f"method.lpips_net.vgg_path={weights}/vgg16.pth"]
    assert check_weights.main(argv) == 0
    assert "ok: 2 weight path(s)" in capsys.readouterr().out


def test_check_weights_lists_every_missing_path_once(weights, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"method": {"teacher": {"path": f"{weights}/dinov2-large"},
                                              "lpips_net": {"vgg_path": f"{weights}/vgg16.pth"}}}))
    argv = ["--root", str(weights), "--no-exec", "--", "python", "job.py", "--config", str(cfg),
            f"method.lpips_net.lin_path={weights}/lpips.pth", f"a.b={weights}/empty", f"c={weights}/zero.pth",
            "--config", str(tmp_path / "absent.yaml")]
    assert check_weights.main(argv) == check_weights.EXIT_MISSING
    err = capsys.readouterr().err
    assert "5 weight path(s) or config file(s) are missing" in err
    assert f"method.teacher.path = {weights}/dinov2-large: not found" in err
    assert f"method.lpips_net.lin_path = {weights}/lpips.pth: not found" in err
    assert f"a.b = {weights}/empty: an empty folder" in err and f"c = {weights}/zero.pth: an empty file" in err
    assert "absent.yaml: cannot read it" in err
    assert "vgg16.pth" not in err  # present: not listed


def test_check_weights_runs_the_job_in_its_place(weights):
    """On success the job replaces the check (exec): its output and exit status are the job's."""
    script = str(INFRA / "check_weights.py")
    job = [sys.executable, "-c", "import sys; print('job ran'); sys.exit(7)", f"x={weights}/vgg16.pth"]
    out = subprocess.run([sys.executable, script, "--root", str(weights), "--", *job], capture_output=True, text=True)
    assert out.returncode == 7 and "job ran" in out.stdout and "ok: 1 weight path(s)" in out.stdout
    out = subprocess.run([sys.executable, script, "--root", str(weights), "--", *job[:-1], f"x={weights}/nope"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "job ran" not in out.stdout and "x = " in out.stderr


# --- load_weights.py -----------------------------------------------------------------------------

def test_load_weights_copies_a_prefix_and_resumes(tmp_path, capsys):
    src = tmp_path / "bucket" / "models"
    (src / "dinov2-base").mkdir(parents=True)
    (src / "dinov2-base" / "config.json").write_text("{}")
    (src / "vgg16.pth").write_bytes(b"w" * 100)
    dst = tmp_path / "pvc"
    assert load_weights.main([f"file://{src}", str(dst)]) == 0
    assert (dst / "dinov2-base" / "config.json").read_text() == "{}" and (dst / "vgg16.pth").stat().st_size == 100
    assert "2 copied, 0 already there" in capsys.readouterr().out
    assert load_weights.main([f"file://{src}", str(dst)]) == 0
    assert "0 copied, 2 already there" in capsys.readouterr().out
    assert not list(dst.rglob("*.part"))
    assert load_weights.main([f"file://{tmp_path}/nothing", str(dst)]) == 1
    assert "cannot copy" in capsys.readouterr().err
