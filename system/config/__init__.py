"""Typed configs (a leaf package: dataclasses + OmegaConf, nothing else from system/, no torch).

sections.py: infra sections; methods.py: each method's own section; experiments.py: one typed
root per job; eval_schema.py: sampling and evaluation jobs; load.py: YAML + `key=value` loading."""
from system.config.load import ConfigError, cli_config, exit_on_config_error, load_config, override_dataclass, parse_argv, peek, redact, redacted_dict, to_dict, to_yaml
from system.config.eval_schema import EvaluateConfig, ImportAliTokConfig, SampleConfig
from system.config.experiments import AliTokStage1Experiment, AliTokStage2Experiment, ARExperiment, EOSTokExperiment, Experiment, LatentCacheConfig, LatentVAEExperiment, MakeShardsConfig, MaskedARExperiment, PretokenizeConfig, RunSpec, SemTokStage1Experiment, SemTokStage2Experiment, VapiExperiment
from system.config.methods import AliTokLossConfig, AliTokStage1Config, AliTokStage2Config, ARConfig, ConvNeXtNetConfig, EOSTokConfig, LatentVAEConfig, LatentVAETrainConfig, LPIPSConfig, MaskedARConfig, ModelConfig, ResNetNetConfig, SemTokStage1Config, SemTokStage2Config, TeacherConfig, VapiConfig
from system.config.sections import *  # noqa: F401,F403 (every infra section)
from system.config.sections import __all__ as _sections

__all__ = [
    "ConfigError", "cli_config", "exit_on_config_error", "load_config", "override_dataclass", "parse_argv", "peek", "redact",
    "redacted_dict", "to_dict", "to_yaml", "AliTokLossConfig", "AliTokStage1Config", "AliTokStage1Experiment",
    "AliTokStage2Config", "AliTokStage2Experiment", "ARConfig", "ARExperiment", "ConvNeXtNetConfig", "MaskedARConfig", "MaskedARExperiment", "RunSpec", "EOSTokConfig", "EOSTokExperiment", "EvaluateConfig", "Experiment",
    "ImportAliTokConfig", "LPIPSConfig", "MakeShardsConfig", "ModelConfig", "PretokenizeConfig", "SampleConfig", "TeacherConfig", "VapiConfig", "VapiExperiment",
    "LatentCacheConfig", "LatentVAEConfig", "LatentVAETrainConfig", "LatentVAEExperiment", "ResNetNetConfig", "SemTokStage1Config",
    "SemTokStage1Experiment", "SemTokStage2Config", "SemTokStage2Experiment",
    *_sections,
]
