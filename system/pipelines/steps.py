"""The step kinds a pipeline is made of, and the pipeline declaration itself.

- `TrainStep`: train a registered method (its typed job config); an experiment with `runs` trains
  those runs side by side. Post-training (VAπ) is a train step whose method trains on rollouts.
- `EncodeStep`: encode a shard set with a frozen export, one output shard per input shard
  (pre-tokenization and the latent cache: system/pipelines/encode.py).
- `SampleStep`, `EvaluateStep`: jobs/sample.py and jobs/evaluate.py on an export.

Each step is done when its `marker` exists (the step's own last write), and names the earlier steps
whose output it reads (`needs`): the runner checks the others' inputs before Ray starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from system.config import ConfigError, EvaluateConfig, Experiment, SampleConfig
from system.data.storage import join


@dataclass(kw_only=True)
class Step:
    name: str
    describe: str = ""  # one console line: what the step makes and where
    needs: tuple[str, ...] = ()  # earlier steps of the pipeline whose output this step reads

    @property
    def marker(self) -> str:
        """The URL whose existence means the step is done."""
        raise NotImplementedError


@dataclass(kw_only=True)
class TrainStep(Step):
    exp: Experiment  # the method's typed job config
    title: str = ""  # the final table's title

    @property
    def marker(self) -> str:
        runs = getattr(self.exp, "runs", None) or {}
        last = f"{self.exp.run_name}-{list(runs)[-1]}" if runs else self.exp.run_name
        return join(self.exp.checkpoint.storage_path, last, "result.json")


@dataclass(kw_only=True)
class EncodeStep(Step):
    encoding: Any  # a system.pipelines.encode.ShardEncoding

    @property
    def marker(self) -> str:
        return join(self.encoding.cfg.out, "index.json")


@dataclass(kw_only=True)
class SampleStep(Step):
    cfg: SampleConfig

    @property
    def marker(self) -> str:
        return join(self.cfg.out, "samples.npz")


@dataclass(kw_only=True)
class EvaluateStep(Step):
    cfg: EvaluateConfig

    @property
    def marker(self) -> str:
        return join(self.cfg.out, "report.json")


@dataclass(frozen=True)
class Pipeline:
    """A paper's pipeline: its config schema and default files, the typed wiring that joins the
    sections (`wire(cfg)` on the loaded tree), and `build(cfg, root)`: the steps `cfg.steps` names,
    in order. `keys`: per step, the summary values the final table shows; `report(state)`: extra
    lines after it (e.g. a before/after comparison)."""

    name: str
    schema: type
    all_steps: tuple[str, ...]
    section_defaults: dict[str, list[str]]
    wire: Callable[[Any], None]
    build: Callable[[Any, str], list[Step]]
    keys: dict[str, tuple[str, ...]]
    defaults: tuple[str, ...] = ()
    report: Optional[Callable[[dict], str]] = None

    def load(self, argv: Sequence[str]) -> Any:
        from system.config.load import load_sectioned_config

        return load_sectioned_config(self.schema, argv, self.defaults, self.section_defaults, self.wire)

    def root(self, cfg: Any) -> str:
        return join(cfg.storage_path, cfg.run_name)

    def steps(self, cfg: Any) -> list[Step]:
        return self.build(cfg, self.root(cfg))


def check_steps(steps: Sequence[str], known: Sequence[str]) -> list[str]:
    """`steps` must be a subset of `known` in that order, each once (ConfigError naming `steps`)."""
    steps = list(steps)
    if any(s not in known for s in steps) or len(set(steps)) != len(steps) or steps != [s for s in known if s in steps]:
        raise ConfigError(f"config key 'steps' = {steps}: a subset of {list(known)} in that order, each once")
    return steps

