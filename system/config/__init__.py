"""Typed configs: one schema (dataclasses), YAML under configs/, `key=value` overrides."""
from system.config.load import ConfigError, cli_config, load_config, override_dataclass, parse_argv, redact, to_dict, to_yaml
from system.config.schema import (
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    DeepSpeedConfig,
    EOSTokExperiment,
    EOSTokMethodConfig,
    ExperimentConfig,
    FaultConfig,
    LoggingConfig,
    LPIPSConfig,
    MakeShardsConfig,
    ModelConfig,
    OptimConfig,
    StorageConfig,
    TeacherConfig,
    TrainConfig,
)

__all__ = [
    "ConfigError", "cli_config", "load_config", "override_dataclass", "parse_argv", "redact", "to_dict", "to_yaml",
    "CheckpointConfig", "ClusterConfig", "DataConfig", "DeepSpeedConfig", "EOSTokExperiment",
    "EOSTokMethodConfig", "ExperimentConfig", "FaultConfig", "LoggingConfig", "LPIPSConfig",
    "MakeShardsConfig", "ModelConfig", "OptimConfig", "StorageConfig", "TeacherConfig", "TrainConfig",
]
