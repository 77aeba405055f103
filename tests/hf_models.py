"""Tiny random Hugging Face Qwen3-VL checkpoints for the parity tests, built in a second or two.

Each config exercises something different: tied vs untied embeddings, head/kv-head counts, mrope
sections, deepstack indexes. `save_tiny(cfg_name, dir)` writes a real HF checkpoint with
`save_pretrained` (real key names, real safetensors).
"""

from __future__ import annotations

import copy

TINY_CONFIGS = {
    # tied embeddings, GQA 4:2, default-shaped mrope section scaled down, deepstack at [0, 1]
    "tied": dict(
        text_config=dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                         max_position_embeddings=4096,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3],
                                              mrope_interleaved=True)),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=4, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0, 1]),
        tie_word_embeddings=True,
    ),
    # untied, MQA-like 6:1 heads, uneven mrope section, deepstack at non-default [1, 3, 4]
    "untied": dict(
        text_config=dict(vocab_size=352, hidden_size=96, intermediate_size=160, num_hidden_layers=5,
                         num_attention_heads=6, num_key_value_heads=1, head_dim=20, rms_norm_eps=1e-5,
                         max_position_embeddings=4096,
                         rope_parameters=dict(rope_type="default", rope_theta=50000.0, mrope_section=[4, 3, 3],
                                              mrope_interleaved=True)),
        vision_config=dict(depth=5, hidden_size=48, intermediate_size=80, num_heads=3, out_hidden_size=96,
                           patch_size=4, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=36,
                           deepstack_visual_indexes=[1, 3, 4]),
        tie_word_embeddings=False,
    ),
}

# Special token ids inside the tiny vocabularies (the real ones are ~151k).
SPECIAL = dict(image_token_id=300, video_token_id=301, vision_start_token_id=302, vision_end_token_id=303)


def hf_config(name: str):
    from transformers import Qwen3VLConfig

    d = copy.deepcopy(TINY_CONFIGS[name])
    return Qwen3VLConfig(**d, **SPECIAL)


def build_tiny(name: str, seed: int = 0):
    """A float32 HF model in eval mode with random weights at realistic activation scale.

    transformers' init (std 0.02) keeps every activation near zero, where a tanh-GELU is
    indistinguishable from an exact one and a misplaced norm barely moves the logits. Here matrices get
    std 1/sqrt(fan_in), embeddings std 1, norm weights 1 +- 0.2 and biases +-0.1, so that every
    component leaves a visible mark on the logits."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(hf_config(name)).eval().to(torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embed_tokens" in pname or "pos_embed" in pname:
                p.copy_(torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / fan_in ** 0.5)
    return model


def save_tiny(name: str, path, seed: int = 0, **save_kwargs):
    model = build_tiny(name, seed)
    model.save_pretrained(str(path), **save_kwargs)
    return model
