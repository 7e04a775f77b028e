#!/usr/bin/env python
"""Check that this Python environment is the tested set of a lock (infra/lock.py).

  python infra/check_image.py                  # CI / a dev venv: infra/lock-cpu.txt
  python infra/check_image.py --target cuda    # the image build: infra/lock-cuda.txt

Every package that the target needs (the project with the target's extras and build tools, then
what they require, as installed here) must be pinned by the lock and installed at its pinned
version, and every pin must be installed; torch is compared with its local label (2.13.0+cpu is
the CPU build; PyPI's 2.13.0 the CUDA one). The Python must be the lock's. For cuda also a CUDA
build of torch and an importable flash-attn. The features the code relies on are checked too:
DataLoader(in_order=...) (torch >= 2.6) and DeepSpeed's torch_autocast (>= 0.17.2). Prints one
line per mismatch and exits 1, or prints `ok` and exits 0.
"""
from __future__ import annotations

import argparse
import inspect
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.version import Version

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lock import TARGETS, closure, installed_requires, read_lock, target_roots  # noqa: E402


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def problems(target: str = "cpu", path: Path | None = None) -> list[str]:
    t = TARGETS[target]
    path = path or t.lock
    pins, header = read_lock(path)
    out = []
    if header.get("target", target) != target:
        out.append(f"{path.name} is the lock of target {header['target']!r}, not {target!r}")
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if header.get("python", here) != here:
        out.append(f"python: {here} here, {path.name} was resolved for {header['python']}")
    needed = closure(target_roots(t), installed_requires, {**default_environment(), "extra": ""})
    out += [f"{name}: installed {installed(name) or 'nothing'}, but {path.name} pins no version of it"
            for name in sorted(needed) if name not in pins]
    for name, want in sorted(pins.items()):
        have = installed(name)
        if have != want:
            out.append(f"{name}: installed {have or 'nothing'}, {path.name} pins {want}")
    if not out:
        import torch.utils.data

        if "in_order" not in inspect.signature(torch.utils.data.DataLoader).parameters:
            out.append("torch: DataLoader has no in_order (needs torch >= 2.6)")
        if Version(installed("deepspeed")) < Version("0.17.2"):
            out.append("deepspeed: torch_autocast needs deepspeed >= 0.17.2")
        if "gpu" in t.extras:
            import torch

            if not torch.version.cuda:
                out.append(f"torch {torch.__version__} is not a CUDA build")
            import flash_attn  # noqa: F401  (its CUDA extension must at least import)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", choices=sorted(TARGETS), default="cpu", help="the lock to check against (default: cpu)")
    ap.add_argument("--lock", type=Path, help="another lock file of that target")
    args = ap.parse_args(argv)
    path = args.lock or TARGETS[args.target].lock
    bad = problems(args.target, path)
    for line in bad:
        print(f"[check_image] {line}", file=sys.stderr)
    if bad:
        print(f"[check_image] this environment is not the tested set of {path}", file=sys.stderr)
        return 1
    print("[check_image] ok: the tested set of", path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
