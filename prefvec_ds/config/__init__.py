"""YAML -> validated dataclasses, dotted CLI overrides, and the DeepSpeed JSON it resolves to."""

from prefvec_ds.config.loader import load_config, save_resolved
from prefvec_ds.config.schema import (DataConfig, DistributedConfig, DPOConfig, ModelConfig,
                                      PreferenceConfig, RunConfig, SFTConfig)

__all__ = ["DataConfig", "DistributedConfig", "DPOConfig", "ModelConfig", "PreferenceConfig",
           "RunConfig", "SFTConfig", "load_config", "save_resolved"]
