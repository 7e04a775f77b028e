"""Typed configs (a leaf package: dataclasses + OmegaConf, nothing else from system/, no torch).

sections.py: infra sections; methods.py: each method's own section; experiments.py: one typed
root per job; eval_schema.py: sampling and evaluation jobs; load.py: YAML + `key=value` loading."""
from system.config.load import ConfigError, cli_config, exit_on_config_error, load_config, override_dataclass, parse_argv, redact, redacted_dict, to_dict, to_yaml
from system.config.eval_schema import EvaluateConfig, SampleConfig
from system.config.experiments import EOSTokExperiment, Experiment, MakeShardsConfig, VapiExperiment
from system.config.methods import EOSTokConfig, LPIPSConfig, ModelConfig, TeacherConfig, VapiConfig
from system.config.sections import (
    MISSING,
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    DeepSpeedConfig,
    FaultConfig,
    LoggingConfig,
    OptimConfig,
    StorageConfig,
    TrainConfig,
)

__all__ = [
    "ConfigError", "cli_config", "exit_on_config_error", "load_config", "override_dataclass", "parse_argv", "redact", "redacted_dict", "to_dict", "to_yaml",
    "MISSING", "CheckpointConfig", "ClusterConfig", "DataConfig", "DeepSpeedConfig", "EOSTokConfig", "EOSTokExperiment",
    "EvaluateConfig", "Experiment", "FaultConfig", "LoggingConfig", "LPIPSConfig", "MakeShardsConfig", "ModelConfig",
    "OptimConfig", "SampleConfig", "StorageConfig", "TeacherConfig", "TrainConfig", "VapiConfig", "VapiExperiment",
]
