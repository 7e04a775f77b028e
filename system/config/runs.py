"""Runs side by side: a job's `runs.<name>` (`RunSpec`: a size preset and dotted overrides) turned
into one typed config per run, `<run_name>-<name>`."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from system.config.load import ConfigError, apply_overrides


def typed_runs(base: Any) -> dict[str, Any]:
    """`expand_runs` for a config already typed (a pipeline's section): each of `base.runs` applied to
    `base` as `key=value` overrides; a job without `runs` is the one run `base`."""
    if not getattr(base, "runs", None):
        return {base.run_name: base}
    out: dict[str, Any] = {}
    for key, spec in base.runs.items():
        name = f"{base.run_name}-{key}"
        extra = [f"run_name={json.dumps(name)}"] + ([f"method.model={json.dumps(spec.model)}"] if spec.model else [])
        extra += [f"{k}={json.dumps(v)}" for k, v in spec.overrides.items()]
        try:
            out[name] = dataclasses.replace(apply_overrides(base, extra), runs={})
        except ConfigError as e:
            out[name] = ConfigError(f"runs.{key}: {e}")
    return out
