#!/usr/bin/env python
"""Write infra/constraints.txt: the exact versions installed in a tested environment.

  .venv/bin/python infra/lock.py          # after `make test` passed on the set you want to pin

Pins every package that tokenizer-ar (with its dev, teachers and gpu extras) needs, directly or
not, at the version installed in the running interpreter, plus the build tools of the GPU image;
keeps the `# gpu image only` section (flash-attn, which CI cannot build) as it is. torch is pinned
without its local label (2.13.0, not 2.13.0+cpu), so the same line admits the CPU build here and a
CUDA build in the image. Both infra/setup.sh (CI, `make setup`) and infra/Dockerfile install with
`pip install -c infra/constraints.txt`.
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
OUT = HERE / "constraints.txt"
PROJECT = "tokenizer-ar"
EXTRAS = ("dev", "teachers", "gpu")
BUILD_TOOLS = ("setuptools",)  # not in `pip freeze`; the image builds flash-attn with it (--no-build-isolation)
GPU_MARK = "# gpu image only"


def closure(extras: tuple[str, ...] = EXTRAS) -> dict[str, str | None]:
    """{name: installed version} of what the project with `extras` requires, transitively (None:
    required but not installed here, e.g. flash-attn without CUDA)."""
    seen: dict[str, str | None] = {}
    done: set[tuple[str, frozenset[str]]] = set()
    todo = [(PROJECT, frozenset(extras))]
    env = default_environment()
    while todo:
        name, wanted = todo.pop()
        key = canonicalize_name(name)
        if (key, wanted) in done:
            continue
        done.add((key, wanted))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            seen.setdefault(key, None)
            continue
        seen[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in wanted | {""}):
                continue
            todo.append((req.name, frozenset(canonicalize_name(e) for e in req.extras)))
    seen.pop(canonicalize_name(PROJECT), None)
    return seen


def main() -> int:
    pins = {name: v for name, v in closure().items() if v is not None}
    for tool in BUILD_TOOLS:
        pins[tool] = metadata.version(tool)
    gpu = []
    if OUT.exists():
        lines = OUT.read_text().splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith(GPU_MARK)]
        if starts:
            gpu = [line for line in lines[starts[0]:] if line.strip()]
    lines = [
        "# The tested set: what CI (infra/setup.sh) and the GPU image (infra/Dockerfile) install, with",
        "# `pip install -c infra/constraints.txt`. Written by infra/lock.py from a passing environment",
        f"# (Python {sys.version_info.major}.{sys.version_info.minor}); the GPU-only section at the end is edited by hand.",
    ]
    for name in sorted(pins):
        version = pins[name]
        if name == "torch":
            version = re.sub(r"\+.*$", "", version)  # 2.13.0+cpu -> 2.13.0: CPU here, CUDA in the image
        lines.append(f"{name}=={version}")
    OUT.write_text("\n".join(lines + [""] + gpu) + "\n")
    print(f"wrote {len(pins)} pins to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
