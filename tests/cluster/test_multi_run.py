"""Several AR runs side by side in one driver (cluster/multi_run.py) on a local Ray (CPU): two tiny
sizes finish together and a re-run resumes both; a crashing run and a run with a bad config fail
alone while the other finishes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from ar_fixtures import ray_local  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> str:
    from ar_fixtures import write_tokens

    return write_tokens(str(tmp_path_factory.mktemp("tokens") / "train"))


def argv(storage, tokens: str, *over: str) -> list[str]:
    return [
        "run_name=side", f"data.url={tokens}", "data.batch_size=4", "data.num_workers=0", "method.model=debug-tiny",
        "method.ema_decay=0.9", "cluster.num_workers=1", "cluster.device=cpu", "cluster.max_failures=0",
        f"checkpoint.storage_path={storage}", "checkpoint.every_steps=2", "checkpoint.keep_last=1", "train.max_steps=4",
        "optim.lr=0.003", "optim.warmup_steps=1", "logging.wandb_mode=disabled", "logging.log_every=1", *over,
    ]


def side_by_side(args: list[str]):
    from cluster.multi_run import expand_runs, run_side_by_side
    from cluster.training import resolve_job
    from system.config import ARExperiment, load_config

    base = load_config(ARExperiment, args)
    runs = expand_runs(ARExperiment, args, [], base)
    return runs, run_side_by_side(runs, resolve_job, group=base.run_name)


def test_expand_runs_names_sizes_and_errors(tmp_path):
    from cluster.multi_run import expand_runs
    from system.config import ARExperiment, ConfigError, load_config

    args = argv(tmp_path, "/data/tok", "runs.s.model=debug-tiny", "runs.l.overrides={method.overrides: {n_layer: 3}, optim.lr: 1.0e-5}",
                "runs.bad.overrides={optim.lrr: 1}")
    runs = expand_runs(ARExperiment, args, [], load_config(ARExperiment, args))
    assert list(runs) == ["side-s", "side-l", "side-bad"]
    s, l, bad = runs.values()
    assert (s.run_name, s.method.model, s.runs) == ("side-s", "debug-tiny", {})
    assert l.method.overrides == {"n_layer": 3} and l.optim.lr == 1e-5 and s.optim.lr == 0.003
    assert isinstance(bad, ConfigError) and "runs.bad" in str(bad) and "optim.lrr" in str(bad)
    one = expand_runs(ARExperiment, argv(tmp_path, "/d"), [], load_config(ARExperiment, argv(tmp_path, "/d")))
    assert list(one) == ["side"]


def test_two_sizes_side_by_side_then_both_resume(ray_local, tokens, tmp_path):
    from cluster.multi_run import exit_status, outcome_table

    sizes = ["runs.s.model=debug-tiny", "runs.m.overrides={method.overrides: {n_layer: 3, dim: 32}}"]
    runs, out = side_by_side(argv(tmp_path, tokens, *sizes, "logging.wandb_mode=offline"))
    assert [(o.name, o.status, o.result and o.result.step) for o in out] == [("side-s", "done", 4), ("side-m", "done", 4)], \
        outcome_table(out)
    assert exit_status(out) == 0
    for name in ("side-s", "side-m"):
        run = tmp_path / name
        assert (run / "checkpoints" / "step_00000004" / "COMMITTED").is_file()
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4] and {"loss", "acc", "tokens_per_s"} <= set(rows[-1])
        assert any((run / "wandb").glob("offline-run-*"))  # one wandb run each
        assert json.loads((run / "export" / "model.json").read_text())["ar"]["kind"] == "gpt"
    dims = {n: json.loads((tmp_path / n / "export" / "model.json").read_text())["ar"]["config"]["n_layer"] for n in runs}
    assert dims == {"side-s": 2, "side-m": 3}
    table = outcome_table(out, ["loss", "acc"])
    assert "side-s" in table and "side-m" in table and "done" in table
    assert (tmp_path / "side" / "logs" / "driver.log").is_file()  # the one driver log of the group

    _, again = side_by_side(argv(tmp_path, tokens, *sizes, "train.max_steps=6"))
    assert [(o.status, o.result and o.result.step) for o in again] == [("done", 6), ("done", 6)], outcome_table(again)
    for name in ("side-s", "side-m"):
        summary = json.loads((tmp_path / name / "metrics.json").read_text())
        assert (summary["start_step"], summary["step"]) == (4, 6)  # resumed from the stored step


def test_one_failing_run_does_not_stop_the_others(ray_local, tokens, tmp_path):
    from cluster.multi_run import exit_status

    runs, out = side_by_side(argv(tmp_path, tokens, "runs.ok.model=debug-tiny",
                                  "runs.crash.overrides={fault.crash_at_step: 2}",  # max_failures=0: the run fails
                                  "runs.broken.model=no-such-size"))
    by = {o.name: o for o in out}
    assert by["side-ok"].status == "done" and by["side-ok"].result.step == 4
    assert by["side-crash"].status == "failed" and not by["side-crash"].config_error
    assert (tmp_path / "side-crash" / "fault" / "crash_at_step_00000002.json").is_file()  # it did crash
    assert by["side-broken"].status == "failed" and by["side-broken"].config_error
    assert "method.model" in by["side-broken"].error
    assert exit_status(out) == 1
