#!/usr/bin/env python
"""The locks: one per target, each the whole dependency closure of that target, made by a resolver.

  python infra/lock.py                    # both targets (needs `uv`: pip install uv, in any venv)
  python infra/lock.py --target cuda      # one of them
  python infra/lock.py --snapshot-only    # re-record the metadata snapshots of the current locks

| target | file | who installs it | torch |
|---|---|---|---|
| cpu  | infra/lock-cpu.txt  | `make setup`, CI (infra/setup.sh) | the CPU build (`+cpu`, PyTorch's CPU index) |
| cuda | infra/lock-cuda.txt | the image (infra/Dockerfile) | PyPI's CUDA build, its triton and nvidia-* |

Each lock is `uv pip compile` of the project's requirements (pyproject.toml, with the target's
extras) for the target's Python and platform, so it holds every package that target installs,
e.g. the CUDA torch's triton / nvidia-* wheels, which a lock frozen from a CPU environment lacks.
flash-attn (sdist only; its build needs torch) enters the CUDA resolution with its declared
requirements (FLASH_ATTN_REQUIRES) instead of being built. Beside each lock,
`lock-<target>.requires.json` records every locked package's requirements (Requires-Dist) as
pip's resolver reported them for that target (`pip install --dry-run --report`), so the closure of a
lock can be checked offline: `closure()` over the snapshot, every package pinned
(tests/infra/test_locks.py; infra/check_image.py does the same over an installed environment).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROJECT = "tokenizer-ar"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# flash-attn's setup.py install_requires (its metadata needs a CUDA build to be generated)
FLASH_ATTN_REQUIRES = ("torch", "einops")


@dataclass(frozen=True)
class Target:
    name: str
    python: str  # major.minor
    platform: str  # uv's --python-platform
    extras: tuple[str, ...]
    torch_local: str | None  # "cpu": torch's CPU build (a +cpu local version); None: PyPI's (CUDA) build
    build_tools: tuple[str, ...] = ()  # pinned too: the image builds flash-attn with --no-build-isolation

    @property
    def lock(self) -> Path:
        return HERE / f"lock-{self.name}.txt"

    @property
    def snapshot(self) -> Path:
        return HERE / f"lock-{self.name}.requires.json"

    def environment(self) -> dict[str, str]:
        """PEP 508 marker values of the target (what its requirements' markers are evaluated with)."""
        return {"python_version": self.python, "python_full_version": f"{self.python}.0",
                "implementation_name": "cpython", "implementation_version": f"{self.python}.0",
                "platform_python_implementation": "CPython", "os_name": "posix", "sys_platform": "linux",
                "platform_system": "Linux", "platform_machine": "x86_64", "platform_release": "",
                "platform_version": "", "extra": ""}


TARGETS = {
    # CI and `make setup` on this project's machines: Python 3.11, no GPU
    "cpu": Target("cpu", "3.11", "x86_64-manylinux_2_28", ("dev",), "cpu"),
    # the image (infra/Dockerfile: Ubuntu 24.04's Python 3.12): every job, SemTok included, and flash-attn
    "cuda": Target("cuda", "3.12", "x86_64-manylinux_2_28", ("gpu", "semtok"), None,
                   ("setuptools", "wheel", "packaging", "ninja", "psutil")),
}


# --- reading -------------------------------------------------------------------------------------

def read_lock(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """({name: version}, {header key: value}) of a lock file (`name==version` lines; `# key: value`
    lines before the first pin are its header)."""
    pins: dict[str, str] = {}
    header: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            m = re.match(r"#\s*(target|python|platform|extras):\s*(\S.*)$", line)
            if m and not pins:
                header[m.group(1)] = m.group(2).strip()
            continue
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or ";" in version or " " in version.strip():
            raise ValueError(f"{path}: {raw!r} is not NAME==VERSION")
        key = canonicalize_name(name.split("[", 1)[0])
        if key in pins:
            raise ValueError(f"{path}: {key} is pinned twice")
        pins[key] = version.strip()
    return pins, header


def project_requires(extras: Iterable[str], pyproject: Path = REPO / "pyproject.toml") -> list[Requirement]:
    """The project's own requirements with `extras` (self-references such as tokenizer-ar[semtok]
    expanded), from pyproject.toml: no build needed."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    out: list[Requirement] = []
    seen: set[str] = set()
    todo = list(extras)
    pending = [Requirement(r) for r in project["dependencies"]]
    while todo or pending:
        if todo:
            extra = todo.pop()
            if extra not in optional:
                raise ValueError(f"pyproject.toml has no extra {extra!r} (has {sorted(optional)})")
            if extra not in seen:
                seen.add(extra)
                pending += [Requirement(r) for r in optional[extra]]
            continue
        req = pending.pop(0)
        if canonicalize_name(req.name) == PROJECT:
            todo.extend(req.extras)
        else:
            out.append(req)
    return out


RequiresOf = Callable[[str], "list[str] | None"]


def closure(roots: Iterable[Requirement], requires_of: RequiresOf, env: dict[str, str]) -> dict[str, set[str]]:
    """{package: the extras asked of it} of everything `roots` need, transitively, with markers
    evaluated in `env`. `requires_of(name)`: its Requires-Dist lines (None: unknown, a leaf here)."""
    need: dict[str, set[str]] = {}
    done: set[tuple[str, str]] = set()
    todo = [(r, "") for r in roots]
    while todo:
        req, via_extra = todo.pop()
        if req.marker and not req.marker.evaluate({**env, "extra": via_extra}):
            continue
        name = canonicalize_name(req.name)
        need.setdefault(name, set()).update(req.extras)
        for extra in ("", *sorted(req.extras)):
            if (name, extra) in done:
                continue
            done.add((name, extra))
            for line in requires_of(name) or []:
                todo.append((Requirement(line), extra))
    return need


def installed_requires(name: str) -> list[str] | None:
    try:
        return list(metadata.distribution(name).requires or [])
    except metadata.PackageNotFoundError:
        return None


def target_roots(target: Target) -> list[Requirement]:
    """What the target installs directly: the project with its extras, and its build tools."""
    return project_requires(target.extras) + [Requirement(t) for t in target.build_tools]


def applies(line: str, extras: Iterable[str], env: dict[str, str]) -> bool:
    """Whether the requirement `line` of a package asked with `extras` applies in `env`."""
    marker = Requirement(line).marker
    return marker is None or any(marker.evaluate({**env, "extra": e}) for e in ("", *extras))


def missing_pins(target: Target, pins: dict[str, str], requires_of: RequiresOf) -> list[str]:
    """The packages of the target's closure that the lock does not pin (sorted)."""
    return sorted(set(closure(target_roots(target), requires_of, target.environment())) - set(pins))


def read_snapshot(target: Target) -> tuple[list[str], RequiresOf]:
    """(the requirements the lock was made from, requires_of over the snapshot)."""
    data = json.loads(target.snapshot.read_text())
    return data["project"], lambda name: data["requires"].get(canonicalize_name(name))


# --- writing -------------------------------------------------------------------------------------

def _uv() -> str:
    uv = os.environ.get("UV") or shutil.which("uv")
    if not uv:
        raise SystemExit("[lock] needs uv (a resolver that targets another Python/platform): "
                         "python -m venv /tmp/uv && /tmp/uv/bin/pip install uv && UV=/tmp/uv/bin/uv python infra/lock.py")
    return uv


def compile_lock(target: Target, torch: str, flash_attn: str | None, torch_cpu_from: str | None,
                 upgrade: bool = False) -> str:
    """`uv pip compile` of the target: the lock's text (header first). Versions already locked are
    kept where they still fit (uv's preferences: the current lock), unless `upgrade`; the cuda
    target is constrained to the cpu lock's versions, so the image runs the set CI tests (torch's
    build and the CUDA-only packages aside)."""
    with tempfile.TemporaryDirectory() as tmp:
        reqs = [str(r) for r in project_requires(target.extras)] + list(target.build_tools)
        reqs = [r for r in reqs if canonicalize_name(Requirement(r).name) not in ("torch", "flash-attn")]
        reqs.append(f"torch=={torch}+{target.torch_local}" if target.torch_local else f"torch=={torch}")
        if flash_attn:
            reqs.append(f"flash-attn=={flash_attn}")
        (Path(tmp) / "in.txt").write_text("\n".join(reqs) + "\n")
        config = Path(tmp) / "uv.toml"
        config.write_text("" if not flash_attn else (
            '[[dependency-metadata]]\nname = "flash-attn"\n'
            f'version = "{flash_attn}"\nrequires-dist = {json.dumps(list(FLASH_ATTN_REQUIRES))}\n'))
        out_file = Path(tmp) / "out.txt"
        if target.lock.exists() and not upgrade:
            out_file.write_text(target.lock.read_text())  # uv keeps these versions where it can
        cmd = [_uv(), "pip", "compile", "in.txt", "-o", str(out_file), "--config-file", str(config),
               "--python-version", target.python, "--python-platform", target.platform, "--no-header",
               "--annotation-style", "line", "--quiet"]
        cpu = TARGETS["cpu"].lock
        if target.torch_local is None and cpu.exists():
            pins = read_lock(cpu)[0]
            (Path(tmp) / "tested.txt").write_text("".join(f"{n}=={v}\n" for n, v in pins.items() if "+" not in v and n != "torch"))
            cmd += ["--constraint", "tested.txt"]
        if target.torch_local == "cpu":
            src = torch_cpu_from or TORCH_CPU_INDEX
            cmd += ["--find-links", src] if not src.startswith("http") else \
                ["--extra-index-url", src, "--index-strategy", "unsafe-best-match"]
        run = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"})
        if run.returncode != 0:
            raise SystemExit(f"[lock] uv pip compile failed for {target.name}:\n{run.stderr}")
        body = out_file.read_text().replace("-r in.txt", "pyproject.toml").replace("-c tested.txt", "lock-cpu.txt")
    head = [f"# The {target.name} lock: every package the {target.name} target installs, at one version each. Written by",
            "# infra/lock.py (uv pip compile, a resolver) from pyproject.toml; do not edit by hand.",
            f"# target: {target.name}", f"# python: {target.python}", f"# platform: {target.platform}",
            f"# extras: {','.join(target.extras)}"]
    return "\n".join(head) + "\n" + body


def pip_platforms(platform: str) -> list[str]:
    """pip's --platform tags for uv's `x86_64-manylinux_2_28`: that glibc and every older manylinux
    (pip does not expand them itself)."""
    arch, tag = platform.split("-", 1)
    m = re.fullmatch(r"manylinux_2_(\d+)", tag)
    if not m:
        return [f"{tag}_{arch}"]
    return [f"manylinux_2_{minor}_{arch}" for minor in range(int(m.group(1)), 4, -1)] + \
        [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]


def _pip_dry_run(args: list[str], pins: dict[str, str], torch_cpu_from: str | None) -> tuple[int, str, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        reqs = Path(tmp) / "reqs.txt"
        reqs.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()))
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(Path(tmp) / "report.json"), *args, "-r", str(reqs)]
        if torch_cpu_from and "+" in pins.get("torch", ""):
            cmd += ["--extra-index-url", torch_cpu_from] if torch_cpu_from.startswith("http") else \
                ["--find-links", torch_cpu_from]
        env = {**os.environ, "PIP_CONSTRAINT": ""}  # a machine-wide constraint file must not steer it
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        report = json.loads((Path(tmp) / "report.json").read_text()) if out.returncode == 0 else {}
        return out.returncode, out.stderr, report


def resolved_requires(target: Target, lock: Path, torch_cpu_from: str | None = TORCH_CPU_INDEX) -> dict[str, list[str]]:
    """{package: its Requires-Dist} of every package of the lock, from pip's resolver run on the whole
    lock for the target's Python and platform (wheels only; --dry-run: nothing is installed). pip
    cannot build an sdist for another platform, so a package without a wheel (deepspeed) is resolved
    without the platform options and --no-deps (its metadata, built here); flash-attn (whose build
    needs a CUDA torch) has FLASH_ATTN_REQUIRES. Raises RuntimeError when pip cannot resolve it."""
    pins = read_lock(lock)[0]
    wheels = {n: v for n, v in pins.items() if n != "flash-attn"}
    sdists: dict[str, str] = {}
    platform = ["--target", "unused",  # pip wants --target beside --platform; --dry-run writes nothing
                "--only-binary", ":all:", "--python-version", target.python, "--implementation", "cp",
                *(a for tag in pip_platforms(target.platform) for a in ("--platform", tag))]
    while True:
        rc, err, report = _pip_dry_run(platform, wheels, torch_cpu_from)
        if rc == 0:
            break
        m = re.search(r"No matching distribution found for ([A-Za-z0-9._-]+)==", err)
        name = canonicalize_name(m.group(1)) if m else None
        if name not in wheels:
            raise RuntimeError(f"pip could not resolve {lock.name} for {target.name}:\n{err[-4000:]}")
        sdists[name] = wheels.pop(name)  # no wheel for the target: its metadata below
    requires = {canonicalize_name(i["metadata"]["name"]): i["metadata"].get("requires_dist", [])
                for i in report["install"]}
    if sdists:
        rc, err, more = _pip_dry_run(["--no-deps"], sdists, torch_cpu_from)
        if rc != 0:
            raise RuntimeError(f"pip could not read the metadata of {sorted(sdists)}:\n{err[-4000:]}")
        requires.update({canonicalize_name(i["metadata"]["name"]): i["metadata"].get("requires_dist", [])
                         for i in more["install"]})
    if "flash-attn" in pins:
        requires["flash-attn"] = list(FLASH_ATTN_REQUIRES)
    return requires


def write_snapshot(target: Target, torch_cpu_from: str | None) -> None:
    """lock-<target>.requires.json: the roots the lock was made from, and each locked package's
    requirements that can apply to the target (its platform, the extras asked of it)."""
    requires = resolved_requires(target, target.lock, torch_cpu_from)
    env = target.environment()
    asked = closure(target_roots(target), requires.get, env)
    kept = {n: [line for line in lines if applies(line, asked.get(n, ()), env)] for n, lines in sorted(requires.items())}
    target.snapshot.write_text(json.dumps({
        "about": f"Requires-Dist of every package of {target.lock.name} for its target ({target.name}: Python "
                 f"{target.python}, {target.platform}), from pip's resolver; written by infra/lock.py",
        "project": [str(r) for r in target_roots(target)],
        "requires": kept}, indent=1) + "\n")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", choices=sorted(TARGETS), action="append", help="default: every target")
    ap.add_argument("--torch", help="torch version (default: the one locked now)")
    ap.add_argument("--flash-attn", help="flash-attn version of the cuda lock (default: the one locked now)")
    ap.add_argument("--torch-cpu-from", default=os.environ.get("PIP_FIND_LINKS") or None,
                    help=f"where torch's CPU wheel is: an index URL (default {TORCH_CPU_INDEX}) or a folder")
    ap.add_argument("--snapshot-only", action="store_true", help="only re-record the requires snapshots")
    ap.add_argument("--upgrade", action="store_true", help="newest versions that fit (default: keep the locked ones)")
    args = ap.parse_args(argv)
    for name in args.target or list(TARGETS):  # cpu first: it constrains cuda
        target = TARGETS[name]
        if not args.snapshot_only:
            old = read_lock(target.lock)[0] if target.lock.exists() else {}
            torch = args.torch or old.get("torch", "").split("+")[0]
            if not torch:
                raise SystemExit("[lock] no torch version locked yet: pass --torch X.Y.Z")
            fa = (args.flash_attn or old.get("flash-attn")) if "gpu" in target.extras else None
            target.lock.write_text(compile_lock(target, torch, fa, args.torch_cpu_from, args.upgrade))
        write_snapshot(target, args.torch_cpu_from or TORCH_CPU_INDEX)
        pins, _ = read_lock(target.lock)
        gaps = missing_pins(target, pins, read_snapshot(target)[1])
        print(f"[lock] {target.lock.name}: {len(pins)} pins for {name} (Python {target.python}, {target.platform})"
              + (f"; NOT pinned: {', '.join(gaps)}" if gaps else ""))
        if gaps:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
