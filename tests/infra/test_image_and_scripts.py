"""The locks (infra/lock-cpu.txt for CI, infra/lock-cuda.txt for the image) and who installs them
(infra/setup.sh for CI, infra/Dockerfile), and the helper scripts the Kubernetes manifests run
(check_weights.py, load_weights.py). tests/infra/test_locks.py checks each lock's closure."""
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
lock = check_image  # check_image imports infra/lock.py as `lock`
TARGETS = sys.modules["lock"].TARGETS
read_lock = sys.modules["lock"].read_lock


# --- the tested set ------------------------------------------------------------------------------

def test_locks_pin_the_versions_the_code_needs():
    cpu, cpu_header = read_lock(TARGETS["cpu"].lock)
    cuda, cuda_header = read_lock(TARGETS["cuda"].lock)
    assert cpu_header["target"] == "cpu" and cuda_header["target"] == "cuda"
    for pins in (cpu, cuda):
        assert Version(pins["torch"]) >= Version("2.6"), "DataLoader(in_order=...) needs torch >= 2.6"
        assert Version(pins["deepspeed"]) >= Version("0.17.2"), "torch_autocast needs deepspeed >= 0.17.2"
        assert Version(pins["ray"]) >= Version("2.58"), "ray.train.get_preemption_info needs Ray >= 2.58"
    assert cpu["torch"].endswith("+cpu"), "CI installs torch's CPU build (no CUDA wheels)"
    assert "+" not in cuda["torch"] and cuda["torch"] == cpu["torch"].split("+")[0], "the image: the same torch, CUDA build"
    assert "flash-attn" in cuda and "triton" in cuda and any(n.startswith("nvidia-") for n in cuda)
    assert not any(n.startswith("nvidia-") or n in ("triton", "flash-attn") for n in cpu), "CI downloads no CUDA wheels"
    for name in ("jsonschema", "jsonpatch", "pyyaml", "pytest"):  # what these tests import
        assert name in cpu
    for name in ("setuptools", "wheel", "ninja", "psutil", "einops"):  # flash-attn's build, --no-build-isolation
        assert name in cuda
    shared = set(cpu) & set(cuda) - {"torch"}
    assert {n: (cpu[n], cuda[n]) for n in shared if cpu[n] != cuda[n]} == {}, "the image runs the versions CI tests"


def test_this_environment_is_the_tested_set():
    """CI installs the CPU lock (infra/setup.sh), so what runs the tests is its tested set; a drift
    here means the lock or the environment is stale (python infra/lock.py)."""
    assert check_image.problems("cpu") == []


def test_check_image_reports_a_drift(tmp_path):
    pins, _ = read_lock(TARGETS["cpu"].lock)
    text = TARGETS["cpu"].lock.read_text().replace(f"ray=={pins['ray']}", "ray==0.0.1")
    (tmp_path / "c.txt").write_text(text)
    assert check_image.problems("cpu", tmp_path / "c.txt") == [f"ray: installed {pins['ray']}, c.txt pins 0.0.1"]
    assert check_image.main(["--lock", str(tmp_path / "c.txt")]) == 1


def test_check_image_reports_a_closure_package_without_a_pin(tmp_path):
    """A package this environment's closure needs but the lock does not pin fails the check (the
    image build runs the same check for the cuda lock)."""
    text = "".join(line + "\n" for line in TARGETS["cpu"].lock.read_text().splitlines()
                   if not line.startswith("urllib3=="))
    (tmp_path / "c.txt").write_text(text)
    bad = check_image.problems("cpu", tmp_path / "c.txt")
    assert any(line.startswith("urllib3: installed ") and line.endswith("but c.txt pins no version of it") for line in bad), bad


def test_check_image_refuses_another_targets_lock():
    bad = check_image.problems("cuda")  # this CPU environment against the image's lock
    assert any(line.startswith("torch: installed 2") for line in bad) or any(line.startswith("python:") for line in bad)
    assert any(line.startswith("flash-attn: installed nothing") for line in bad)
    assert check_image.problems("cpu", TARGETS["cuda"].lock)[0] == "lock-cuda.txt is the lock of target 'cuda', not 'cpu'"


def test_setup_installs_with_the_locks():
    text = (INFRA / "setup.sh").read_text()
    assert subprocess.run(["bash", "-n", str(INFRA / "setup.sh")]).returncode == 0
    installs = [line for line in text.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert installs
    for line in installs:
        assert '-c "$PINS"' in line, f"infra/setup.sh installs without the lock: {line.strip()}"
    assert "infra/lock-cpu.txt" in text and "infra/lock-cuda.txt" in text


def test_setup_pins_of_a_gpu_machine(tmp_path):
    """setup.sh's GPU pins: the CPU lock without its torch, plus torch and the CUDA-only packages of
    the CUDA lock (the awk line of setup.sh, run on the real locks)."""
    text = (INFRA / "setup.sh").read_text()
    (awk,) = [line.strip() for line in text.splitlines() if line.strip().startswith("awk -F'=='")]
    script = ("pins_of() { grep -E '^[A-Za-z0-9]' \"$1\" | sed 's/[[:space:]]*#.*//'; }\n"
              f"pins_of {TARGETS['cpu'].lock} | grep -v -E '^torch==' > other.txt\n"
              + awk.replace('"$TMP/other.txt" <(pins_of "$CUDA_LOCK")', f"other.txt <(pins_of {TARGETS['cuda'].lock})"))
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    extra = dict(line.split("==") for line in out.stdout.split())
    cpu, cuda = read_lock(TARGETS["cpu"].lock)[0], read_lock(TARGETS["cuda"].lock)[0]
    assert extra["torch"] == cuda["torch"] and "triton" in extra and "numpy" not in extra
    assert set(extra) == {n for n in cuda if n not in cpu} | {"torch"}


def dockerfile() -> str:
    return (INFRA / "Dockerfile").read_text()


def test_image_base_has_the_cuda_build_tools_of_the_locked_torch():
    """The base brings nvcc (a -devel image) of the CUDA major the locked torch is built for, and the
    lock's Python (Ubuntu 24.04: 3.12); the build checks the Python again."""
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", dockerfile(), re.M)
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?devel-ubuntu(\d+\.\d+)(@sha256:[0-9a-f]{64})?", base)
    assert m, f"base image {base}: expected nvidia/cuda:<x.y.z>-devel-ubuntu<release> (devel: nvcc for flash-attn)"
    cuda, header = read_lock(TARGETS["cuda"].lock)
    assert int(m.group(1)) == Version(cuda["nvidia-cuda-runtime"]).major, "nvcc's CUDA major must be torch's"
    assert m.group(3) == "24.04" and header["python"] == "3.12", "Ubuntu 24.04's python3 is the lock's 3.12"
    assert "# python: //p' infra/lock-cuda.txt" in dockerfile(), "the build compares the Python with the lock's"


def test_image_installs_the_tested_set_as_a_non_root_user():
    text = dockerfile()
    runs = re.sub(r"\\\n", " ", text)
    pip_installs = [seg for line in runs.splitlines() for seg in line.split(";") if "pip install" in seg]
    assert pip_installs
    for seg in pip_installs:
        assert "-c infra/lock-cuda.txt" in seg, f"an unpinned pip install in the image: {seg.strip()}"
    (fa,) = [seg for seg in pip_installs if "flash-attn" in seg]
    assert "--no-build-isolation" in fa, "flash-attn must build against the installed torch"
    (archs,) = re.findall(r'^ARG FLASH_ATTN_CUDA_ARCHS="?([^"\n]+)"?$', text, re.M)
    assert {"80", "90"} <= set(archs.split(";")), "flash-attn must have kernels for A100 (8.0) and H100 (9.0)"
    assert 'FLASH_ATTN_CUDA_ARCHS="${FLASH_ATTN_CUDA_ARCHS}"' in fa
    assert "check_image.py --target cuda" in text, "the build verifies the tested set"
    assert not any(" -e " in seg or "--editable" in seg for seg in pip_installs), "a regular install, as users get"
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

    for folder in [*(K8S / "overlays").iterdir(), K8S / "weights", K8S / "cluster-setup"]:
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
