#!/usr/bin/env python
"""Check the local weight files a job will read, then run the job (the RayJob's entrypoint).

  python infra/check_weights.py [--root /models] -- python jobs/eostok_h.py --config run.yaml k=v ...

Reads the job's own command line: the `--config FILE` YAML files and `key=value` overrides. Every
value that is a path under a root (default /models, the weights volume) must exist: a non-empty
file or a non-empty folder. If any is missing, prints one message listing each missing path with
its config key and exits 2 before the job starts (no Ray Train workers, no retries); otherwise
replaces itself with the job (same PID, same exit status).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Iterator

import yaml

EXIT_MISSING = 2


def values(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf value) of a YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from values(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from values(v, f"{key}[{i}]")
    else:
        yield key, node


def job_settings(cmd: list[str]) -> tuple[list[tuple[str, Any]], list[str]]:
    """((key, value) pairs of the job's --config files then key=value overrides, problems)."""
    pairs: list[tuple[str, Any]] = []
    problems = []
    i = 0
    while i < len(cmd):
        arg = cmd[i]
        path = None
        if arg == "--config" and i + 1 < len(cmd):
            path, i = cmd[i + 1], i + 1
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-"):
            key, raw = arg.split("=", 1)
            try:
                pairs.extend(values(yaml.safe_load(raw), key))
            except yaml.YAMLError:
                pairs.append((key, raw))
        if path is not None:
            try:
                with open(path) as f:
                    pairs.extend(values(yaml.safe_load(f) or {}))
            except OSError as e:
                problems.append(f"--config {path}: cannot read it ({e.strerror or e})")
            except yaml.YAMLError as e:
                problems.append(f"--config {path}: not YAML ({e})")
        i += 1
    return pairs, problems


def under(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root + "/")


def why_missing(path: str) -> str | None:
    """None when `path` is a readable non-empty file or non-empty folder, else the reason."""
    if not os.path.exists(path):
        return "not found"
    if os.path.isdir(path):
        try:
            return None if os.listdir(path) else "an empty folder"
        except OSError as e:
            return f"not readable ({e.strerror})"
    if not os.access(path, os.R_OK):
        return "not readable by this user"
    return None if os.path.getsize(path) > 0 else "an empty file"


def check(cmd: list[str], roots: list[str]) -> tuple[list[str], list[str]]:
    """(paths checked, one line per missing path or unreadable config)."""
    pairs, problems = job_settings(cmd)
    checked = []
    for key, value in pairs:
        if isinstance(value, str) and any(under(value, r) for r in roots):
            checked.append(value)
            reason = why_missing(value)
            if reason:
                problems.append(f"{key} = {value}: {reason}")
    return checked, problems


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: check_weights.py [--root DIR]... [--no-exec] -- JOB COMMAND...", file=sys.stderr)
        return EXIT_MISSING
    cut = argv.index("--")
    ap = argparse.ArgumentParser(prog="check_weights.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", action="append", help="a folder holding weights (repeatable; default /models)")
    ap.add_argument("--no-exec", action="store_true", help="only check; do not run the job")
    args = ap.parse_args(argv[:cut])
    cmd = argv[cut + 1:]
    if not cmd:
        ap.error("no job command after --")
    roots = args.root or ["/models"]
    checked, problems = check(cmd, roots)
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        print(f"[check_weights] the job cannot start: {len(problems)} weight path(s) or config file(s) are missing "
              f"(weights under {', '.join(roots)}: is the weights volume mounted and filled? see infra/README.md):\n"
              f"{lines}", file=sys.stderr, flush=True)
        return EXIT_MISSING
    print(f"[check_weights] ok: {len(checked)} weight path(s) under {', '.join(roots)} present", flush=True)
    if args.no_exec:
        return 0
    os.execvp(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
