"""The Qwen3-VL model as Flax NNX modules: numerics only (no files, tokenizers or generation loops)."""
