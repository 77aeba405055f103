"""Converter from Hugging Face Qwen3-VL safetensors checkpoints to the qvl_jax param format.

    python -m qvl_jax.convert HF_DIR OUT_DIR [--dtype auto|bfloat16|float32|float16] [--force]
"""

from qvl_jax.convert.core import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    PARAMS_FILE,
    convert_checkpoint,
    load_hf_params,
    make_plan,
)

__all__ = ["FORMAT_VERSION", "MANIFEST_FILE", "PARAMS_FILE", "convert_checkpoint", "load_hf_params", "make_plan"]
