"""The built-in `tiny-random` model: a small random Qwen3-VL checkpoint in the real Hugging Face layout.

It lets the whole user path (convert -> load -> process -> generate) run on a fresh machine with no
download and no PyTorch: config.json, model.safetensors with the real tensor names, a small byte-level
tokenizer carrying the Qwen special tokens, the chat template, and the processor configs. Its answers
are random text: it exists to exercise the machinery, not to answer questions. `tiny-random-moe` is
its Mixture-of-Experts sibling (qwen3_vl_moe: 8 experts, top-2, one dense layer), stored in the
expert layout transformers 5 writes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from qvl_jax.config import Qwen3VLConfig
from qvl_jax.convert.table import LAYOUT_METADATA, OUT_IN, rules_for
from qvl_jax.files import temp_sibling
from qvl_jax.processing.image_processing import QWEN3_VL_VIDEO_MAX_PIXELS
from qvl_jax.processing.tokenizer_files import write_tiny_tokenizer

TINY_NAME = "tiny-random"
TINY_MOE_NAME = "tiny-random-moe"
VOCAB_SIZE = 512


def tiny_config(special: dict, moe: bool = False) -> dict:
    """config.json in the dialect transformers 5 writes; real patch geometry, tiny widths."""
    config = _dense_config(special)
    if moe:
        config.update(architectures=["Qwen3VLMoeForConditionalGeneration"], model_type="qwen3_vl_moe")
        config["text_config"].update(model_type="qwen3_vl_moe_text", num_experts=8, num_experts_per_tok=2,
                                     moe_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[3],
                                     router_aux_loss_coef=0.001)
        config["vision_config"]["model_type"] = "qwen3_vl_moe_vision"
    return config


def _dense_config(special: dict) -> dict:
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "dtype": "float32",
        "tie_word_embeddings": True,
        "image_token_id": special["image_token_id"],
        "video_token_id": special["video_token_id"],
        "vision_start_token_id": special["vision_start_token_id"],
        "vision_end_token_id": special["vision_end_token_id"],
        "text_config": {
            "model_type": "qwen3_vl_text", "vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 8192, "attention_bias": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3],
                                "mrope_interleaved": True},
        },
        "vision_config": {
            "model_type": "qwen3_vl_vision", "depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
            "out_hidden_size": 64, "in_channels": 3, "patch_size": 16, "temporal_patch_size": 2,
            "spatial_merge_size": 2, "num_position_embeddings": 64, "deepstack_visual_indexes": [1, 2],
            "hidden_act": "gelu_pytorch_tanh", "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
        },
    }


def _random_weights(config: dict, seed: int) -> dict[str, np.ndarray]:
    """Random tensors under the real HF names and shapes (the converter's key table, read backwards),
    scaled so that activations stay O(1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for rule in rules_for(Qwen3VLConfig.from_hf_dict(config)):
        for key in rule.source_keys():
            shape = rule.src_shape
            if "norm" in key and key.endswith("weight"):
                w = 1.0 + 0.1 * rng.standard_normal(shape)
            elif key.endswith("bias"):
                w = 0.02 * rng.standard_normal(shape)
            elif "embed_tokens" in key:
                # Small: with std-1 tied embeddings every token predicts itself and the demo prints
                # one character forever.
                w = 0.05 * rng.standard_normal(shape)
            elif "pos_embed" in key:
                w = rng.standard_normal(shape)
            elif ".experts." in key:  # [experts, out, in]: an expert's fan-in is the last dim
                w = rng.standard_normal(shape) / np.sqrt(shape[-1])
            else:
                w = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
            out[key] = w.astype(np.float32)
    return out


def write_tiny_checkpoint(out_dir: str | os.PathLike, seed: int = 0, moe: bool = False) -> Path:
    """Writes the tiny-random (moe: tiny-random-moe) HF checkpoint to out_dir (atomically: a temp dir
    renamed into place)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out_dir)
    try:
        special = write_tiny_tokenizer(tmp, vocab_size=VOCAB_SIZE)
        config = tiny_config(special, moe)
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        eos = special["eos_token_id"]
        (tmp / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": eos, "pad_token_id": special["pad_token_id"]}, indent=1) + "\n")
        # Small pixel budgets keep the demo fast on a CPU: at most 256 patches per image.
        (tmp / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "Qwen2VLImageProcessorFast", "patch_size": 16, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "size": {"shortest_edge": 32 * 32, "longest_edge": 256 * 16 * 16}}, indent=1) + "\n")
        (tmp / "video_preprocessor_config.json").write_text(json.dumps({
            "video_processor_type": "Qwen3VLVideoProcessor", "patch_size": 16, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "fps": 2,
            "min_frames": 2, "max_frames": 8,
            "size": {"shortest_edge": 32 * 32, "longest_edge": min(QWEN3_VL_VIDEO_MAX_PIXELS, 8 * 256 * 16 * 16)}},
            indent=1) + "\n")
        metadata = {"format": "pt"}
        if moe:
            metadata[LAYOUT_METADATA] = OUT_IN
        save_file(_random_weights(config, seed), str(tmp / "model.safetensors"), metadata=metadata)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
