"""Every job configuration this project ships, as the steps its `--dry-run` plans: each pipeline at
its paper sizes and as its CPU demo, each training job's own YAML, and the README's job sequences
(the demo's tokenizer -> pre-tokenize -> AR sizes side by side; -> VAπ). `shipped()` lists them;
every YAML under configs/experiments/ is read by at least one (tests/system/pipelines)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from system.config import load_config
from system.data.storage import join
from system.pipelines.steps import EncodeStep, Pipeline, Step, TrainStep


@dataclass
class Entry:
    """A shipped job as a dry run plans it: `steps(root)` -> its steps with every run under `root`;
    `files`: the YAML files it reads (relative to configs/)."""

    name: str
    steps: Callable[[str], list[Step]]
    files: list[str] = field(default_factory=list)


def pipeline_entry(name: str, pipeline: Pipeline, *config_files: str) -> Entry:
    argv = [a for f in config_files for a in ("--config", f"configs/{f}")]

    def steps(root: str) -> list[Step]:
        return pipeline.steps(pipeline.load([*argv, f"storage_path={root}"]))

    sections = pipeline.load(argv).section_configs  # e.g. the tiny pipelines' per-stage presets
    files = [*pipeline.defaults, *(f for fs in pipeline.section_defaults.values() for f in fs), *config_files,
             *(f for fs in sections.values() for f in fs)]
    return Entry(name, steps, files)


def _train(schema: type, defaults: list[str], root: str, *argv: str) -> TrainStep:
    exp = load_config(schema, [*argv, f"checkpoint.storage_path={root}"], defaults)
    return TrainStep(name=exp.run_name, exp=exp)


def job_entry(name: str, schema: type, defaults: list[str], *argv: str) -> Entry:
    return Entry(name, lambda root: [_train(schema, defaults, root, *argv)], list(defaults))


def shipped() -> list[Entry]:
    """Every shipped configuration (paper and tiny), each planned as its job would plan it."""
    from system.config import (
        AliTokStage1Experiment, ARExperiment, EOSTokExperiment, PretokenizeConfig, VapiExperiment)
    from system.pipelines.alitok import ALITOK
    from system.pipelines.encode import TokenEncoding
    from system.pipelines.eostok import EOSTOK
    from system.pipelines.semtok import SEMTOK

    base = ["base.yaml", "data/imagenet.yaml"]
    eostok_h = [*base, "model/eostok_h.yaml", "experiments/eostok_h.yaml"]
    tiny = ["experiments/eostok_tiny.yaml"]

    def two_stage_demo(root: str) -> list[Step]:  # README: make demo -> pretokenize -> train_ar ar_tiny.yaml; vapi_tiny
        tok = _train(EOSTokExperiment, tiny, root)
        export, tokens = join(root, tok.exp.run_name, "export"), join(root, tok.exp.run_name, "tokens", "train")
        enc = PretokenizeConfig(src=tok.exp.data.url, out=tokens, export_url=export, augment="flip")
        return [tok, EncodeStep(name="pretokenize", encoding=TokenEncoding(enc)),
                _train(ARExperiment, ["base.yaml", "experiments/ar_tiny.yaml"], root, f"data.url={tokens}",
                       f"method.tokenizer_export={export}"),
                _train(VapiExperiment, ["experiments/vapi_tiny.yaml"], root, f"method.export_url={export}")]

    def vapi_on_eostok_h(root: str) -> list[Step]:  # README: jobs/vapi.py on an EOSTok-H export
        tok = _train(EOSTokExperiment, eostok_h, root)
        return [tok, _train(VapiExperiment, ["data/imagenet.yaml", "experiments/vapi.yaml"], root,
                            f"method.export_url={join(root, tok.exp.run_name, 'export')}")]

    return [
        pipeline_entry("alitok (paper)", ALITOK),
        pipeline_entry("alitok (tiny)", ALITOK, "experiments/alitok_tiny.yaml"),
        pipeline_entry("alitok ablation (tiny)", ALITOK, "experiments/alitok_tiny.yaml", "experiments/alitok_ablation.yaml"),
        pipeline_entry("semtok (paper)", SEMTOK),
        pipeline_entry("semtok (tiny)", SEMTOK, "experiments/semtok_tiny.yaml"),
        pipeline_entry("eostok pipeline (paper)", EOSTOK),
        pipeline_entry("eostok pipeline (tiny)", EOSTOK, "experiments/eostok_pipeline_tiny.yaml"),
        job_entry("eostok-h", EOSTokExperiment, eostok_h),
        job_entry("alitok stage 1 (tiny, alone)", AliTokStage1Experiment, [*base, "experiments/alitok_tiny_stage1.yaml"]),
        Entry("demo -> pretokenize -> AR sizes -> VAπ (tiny)", two_stage_demo,
              [*tiny, "experiments/ar_tiny.yaml", "experiments/vapi_tiny.yaml"]),
        Entry("eostok-h -> VAπ (paper)", vapi_on_eostok_h, [*eostok_h, "experiments/vapi.yaml"]),
    ]
