"""Fine-tuning on the NNX module tree with optax: full or LoRA (PEFT's format), exact against
transformers + torch."""

from qvl_jax.training.lora import LoraConfig
from qvl_jax.training.trainer import Trainer

__all__ = ["LoraConfig", "Trainer"]
