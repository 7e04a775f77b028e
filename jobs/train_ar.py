#!/usr/bin/env python
"""AR image generators on token shards (jobs/pretokenize.py) on Ray Train + DeepSpeed: next-token
(`objective=ar`, LlamaGen's recipe by default) or SemTok's masked AR (`objective=masked_ar`), one
size or several side by side (`runs.<name>.model=...`: one Ray Train run each).

  python jobs/train_ar.py data.url=s3://bucket/tokens/train method.model=llamagen-l
  python jobs/train_ar.py --config configs/experiments/ar_alitok.yaml data.url=...      # AliTok recipe
  python jobs/train_ar.py --config configs/experiments/ar_semtok.yaml data.url=...      # masked AR
  python jobs/train_ar.py data.url=... run_name=ar runs.b.model=llamagen-b runs.l.model=llamagen-l
  python jobs/train_ar.py --config configs/experiments/ar_tiny.yaml                     # embedded demo

Runs are named `<run_name>-<name>`; re-running resumes each from its newest checkpoint. A run that
fails does not stop the others; the exit status is 1 when any failed, 2 for config errors only.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, also under `ray job submit`

from system.config import ARExperiment, MaskedARExperiment, cli_config, peek  # noqa: E402
from system.config.load import dry_run_requested  # noqa: E402

SCHEMAS = {"ar": ARExperiment, "masked_ar": MaskedARExperiment}
DEFAULTS = {"ar": ["base.yaml", "experiments/ar_llamagen.yaml"], "masked_ar": ["base.yaml", "experiments/ar_semtok.yaml"]}
KEYS = ("loss", "acc", "tokens_per_s", "mfu")


def objective(argv: list[str]) -> str:
    """The `objective` the command line asks for (its --config files, then objective=...); the
    schema of that objective then reads (and checks) the whole config."""
    value = peek(argv, "objective", "ar")
    return value if value in SCHEMAS else "ar"


def main(argv: list[str]) -> int:
    name = objective(argv)
    schema, defaults = SCHEMAS[name], DEFAULTS[name]
    base = cli_config(schema, argv, defaults)  # exit 2 on a bad config, before Ray
    if dry_run_requested(argv):
        from cluster.cli import dry_run

        dry_run(base)  # every run of `runs`, planned; exits
    from cluster.console import say
    from cluster.multi_run import exit_status, expand_runs, outcome_table, run_side_by_side
    from cluster.results import write_run_result
    from cluster.training import resolve_job

    runs = expand_runs(schema, argv, defaults, base)
    outcomes = run_side_by_side(runs, resolve_job, group=base.run_name)
    for o in outcomes:
        if o.status == "done":
            write_run_result(o.result, runs[o.name].data.storage, {"seconds": o.seconds})
    status = exit_status(outcomes)
    if status == 2:
        for o in outcomes:
            print(f"config error: {'' if len(outcomes) == 1 else f'[{o.name}] '}{o.error}", file=sys.stderr)
        return 2
    print(f"[{base.run_name}] {base.objective} on {base.data.url}\n" + outcome_table(outcomes, KEYS))
    for o in outcomes:
        if o.status == "done" and o.result.export_url:
            say(f"sample {o.name}: python jobs/sample.py export_url={o.result.export_url} num_per_class=8"
                + ("" if runs[o.name].method.tokenizer_export else "  (needs method.tokenizer_export: the export has no tokenizer)"))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
