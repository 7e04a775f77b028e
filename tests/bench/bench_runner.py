"""Run a bench script as shipped (`python bench/<name>.py ...` from the repo, CPU DeepSpeed accelerator,
offline wandb, a locally started Ray: no RAY_ADDRESS inherited) and read the figures it prints."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NUMBER = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def run_bench(name: str, *args: str, timeout: int = 300) -> str:
    """stdout of `bench/<name>.py args`; fails the test with the output's tail unless it exits 0."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"bench/{name}.py exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def figures(text: str, label: str, count: int = 1) -> list[float]:
    """The first `count` numbers after `label` on the last line that starts with it (else the last
    that holds it: a script's table comes after the output of the jobs it runs); the test fails when
    the line or the numbers are missing."""
    lines = text.splitlines()
    line = next((x for x in reversed(lines) if x.lstrip().startswith(label)), None) or \
        next((x for x in reversed(lines) if label in x), None)
    assert line is not None, f"no line with {label!r} in:\n{text[-3000:]}"
    found = [float(v) for v in re.findall(NUMBER, line.split(label, 1)[1])][:count]
    assert len(found) == count, f"expected {count} number(s) after {label!r}: {line!r}"
    return found
