"""qvl_jax: a JAX inference engine for the Qwen3-VL vision-language models."""

from qvl_jax.config import Qwen3VLConfig, TextConfig, VisionConfig
from qvl_jax.errors import CheckpointError, ConfigError, InputError, NumericalError, QvlError, ResourceError
from qvl_jax.api import Model, load
from qvl_jax.processing.processor import Processor

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "InputError",
    "Model",
    "NumericalError",
    "Processor",
    "QvlError",
    "ResourceError",
    "Qwen3VLConfig",
    "TextConfig",
    "VisionConfig",
    "load",
]
