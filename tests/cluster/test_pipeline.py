"""cluster/pipeline.py's runner: done steps (marker present) are skipped, a failed step leaves the
earlier ones done and a re-run continues at it, pipeline.json records each step."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import pytest

from cluster.pipeline import run_pipeline, run_step, state_table
from system.pipelines.steps import Step


@dataclass(kw_only=True)
class CallStep(Step):
    """A step kind of the test's own: runs `fn`, done when `done_file` exists."""

    done_file: str
    fn: Callable[[], dict]

    @property
    def marker(self) -> str:
        return self.done_file


@run_step.register
def _(step: CallStep, title: str) -> dict:  # a new step kind plugs into the runner without touching it
    return step.fn()


def _steps(root, calls, fail_at=None):
    def make(name):
        def run():
            calls.append(name)
            if name == fail_at:
                raise RuntimeError(f"{name} killed")
            (root / f"{name}.done").write_text("x")  # the step's last write: its marker
            return {"value": len(calls)}
        return CallStep(name=name, done_file=str(root / f"{name}.done"), fn=run)
    return [make(n) for n in ("a", "b", "c", "d")]


@pytest.mark.parametrize("fail_at", ["a", "b", "c", "d"])
def test_rerun_continues_at_the_step_that_failed(tmp_path, fail_at):
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="killed"):
        run_pipeline("t", _steps(tmp_path, calls, fail_at), str(tmp_path))
    names = "abcd"
    assert calls == list(names[: names.index(fail_at) + 1])
    state = json.loads((tmp_path / "pipeline.json").read_text())
    assert state["steps"][fail_at]["status"] == "running"
    calls.clear()
    state = run_pipeline("t", _steps(tmp_path, calls), str(tmp_path), config_yaml="a: 1\n")
    assert calls == list(names[names.index(fail_at):])  # done steps are not run again
    assert all(e["status"] == "done" for e in state["steps"].values())
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n"
    calls.clear()
    run_pipeline("t", _steps(tmp_path, calls), str(tmp_path))
    assert calls == []  # everything done: nothing runs
    assert "value" in state_table("t", state, {"d": ("value",)})
