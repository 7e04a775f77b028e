#!/usr/bin/env python
"""Check that this Python environment is the tested set of infra/constraints.txt.

  python infra/check_image.py                                # CI / a dev venv (extras: dev)
  python infra/check_image.py --gpu --extras gpu,teachers    # the image build

Every package that tokenizer-ar with those extras needs (transitively) must be installed at its
pinned version; with --gpu also a CUDA build of torch and flash-attn. Prints one line per mismatch
and exits 1, or prints `ok` and exits 0. torch is compared without its local label (2.13.0+cpu
and 2.13.0+cu130 are both 2.13.0). The features the code relies on are checked too:
DataLoader(in_order=...) (torch >= 2.6) and DeepSpeed's torch_autocast (>= 0.17.2).
"""
from __future__ import annotations

import argparse
import inspect
import sys
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lock import closure  # noqa: E402

CONSTRAINTS = Path(__file__).resolve().parent / "constraints.txt"
GPU_MARK = "# gpu image only"


def read_pins(path: Path = CONSTRAINTS) -> tuple[dict[str, str], dict[str, str]]:
    """({name: version} of the tested set, {name: version} of the GPU-only section)."""
    common: dict[str, str] = {}
    gpu: dict[str, str] = {}
    section = common
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith(GPU_MARK):
            section = gpu
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"{path}: {raw!r} is not NAME==VERSION")
        section[canonicalize_name(name)] = version.strip()
    return common, gpu


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def problems(gpu: bool, extras: tuple[str, ...] = ("dev",), path: Path = CONSTRAINTS) -> list[str]:
    common, gpu_pins = read_pins(path)
    needed = closure(tuple(extras) + (("gpu",) if gpu else ()))
    pins = {**common, **(gpu_pins if gpu else {})}
    out = [f"{name}: installed {have or 'nothing'}, but constraints pin no version of it"
           for name, have in sorted(needed.items()) if name not in pins]
    for name, want in sorted(pins.items()):
        if name not in needed and name not in gpu_pins:
            continue  # the pin of another extra (or a build tool): not needed here
        have = installed(name)
        if have is not None and name == "torch":
            have = have.split("+", 1)[0]
        if have != want:
            out.append(f"{name}: installed {have or 'nothing'}, constraints pin {want}")
    if not out:
        import torch.utils.data

        if "in_order" not in inspect.signature(torch.utils.data.DataLoader).parameters:
            out.append("torch: DataLoader has no in_order (needs torch >= 2.6)")
        if Version(installed("deepspeed")) < Version("0.17.2"):
            out.append("deepspeed: torch_autocast needs deepspeed >= 0.17.2")
        if gpu:
            import torch

            if not torch.version.cuda:
                out.append(f"torch {torch.__version__} is not a CUDA build")
            import flash_attn  # noqa: F401  (its CUDA extension must at least import)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="also require a CUDA torch and the GPU-only pins (flash-attn)")
    ap.add_argument("--extras", default="dev", help="the project's extras installed here, comma-separated (default: dev)")
    ap.add_argument("--constraints", type=Path, default=CONSTRAINTS)
    args = ap.parse_args(argv)
    bad = problems(args.gpu, tuple(e for e in args.extras.split(",") if e), args.constraints)
    for line in bad:
        print(f"[check_image] {line}", file=sys.stderr)
    if bad:
        print(f"[check_image] this environment is not the tested set of {args.constraints}", file=sys.stderr)
        return 1
    print("[check_image] ok: the tested set of", args.constraints)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
