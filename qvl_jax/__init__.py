"""qvl_jax: a JAX inference engine for the Qwen3-VL vision-language models."""

import importlib

from qvl_jax.config import Qwen3VLConfig, TextConfig, VisionConfig
from qvl_jax.errors import CheckpointError, ConfigError, InputError, NumericalError, QvlError, ResourceError

__version__ = "0.1.0"

# Imported on first use, so that `import qvl_jax` (and `qvl-jax --help`) does not pay for JAX.
_LAZY = {
    "Model": "qvl_jax.api",
    "load": "qvl_jax.api",
    "Processor": "qvl_jax.processing.processor",
    "Trainer": "qvl_jax.training.trainer",
    "LoraConfig": "qvl_jax.training.lora",
    "SamplingParams": "qvl_jax.engine.sampling",
    "StructuredOutputs": "qvl_jax.engine.structured",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qvl_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CheckpointError",
    "ConfigError",
    "InputError",
    "LoraConfig",
    "Model",
    "NumericalError",
    "Processor",
    "QvlError",
    "Qwen3VLConfig",
    "ResourceError",
    "SamplingParams",
    "StructuredOutputs",
    "TextConfig",
    "Trainer",
    "VisionConfig",
    "load",
]
