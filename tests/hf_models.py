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

_MOE_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                   temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64,
                   deepstack_visual_indexes=[0, 1])
_MOE_ROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3], mrope_interleaved=True)

# Mixture-of-Experts (qwen3_vl_moe) configs; built by the same save_tiny.
MOE_CONFIGS = {
    # untied; every layer sparse but layer 1 (mlp_only_layers); 8 experts, top-2; d != f, 2f
    "moe": dict(
        text_config=dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                         max_position_embeddings=4096, num_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[1],
                         rope_parameters=_MOE_ROPE),
        vision_config=_MOE_VISION, tie_word_embeddings=False,
    ),
    # tied; decoder_sparse_step 2 (layers 1 and 3 sparse); 6 experts, top-3
    "moe_step": dict(
        text_config=dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=16, rms_norm_eps=1e-6,
                         max_position_embeddings=4096, num_experts=6, num_experts_per_tok=3,
                         moe_intermediate_size=40, decoder_sparse_step=2, rope_parameters=_MOE_ROPE),
        vision_config=_MOE_VISION, tie_word_embeddings=True,
    ),
    # d == 2f: gate_up_proj's shape is the same in both expert layouts (the layout tests)
    "moe_square": dict(
        text_config=dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                         max_position_embeddings=4096, num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=32, rope_parameters=_MOE_ROPE),
        vision_config=_MOE_VISION, tie_word_embeddings=False,
    ),
}

# Special token ids inside the tiny vocabularies (the real ones are ~151k).
SPECIAL = dict(image_token_id=300, video_token_id=301, vision_start_token_id=302, vision_end_token_id=303)


def hf_config(name: str):
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    if name in MOE_CONFIGS:
        return Qwen3VLMoeConfig(**copy.deepcopy(MOE_CONFIGS[name]), **SPECIAL)
    d = copy.deepcopy(TINY_CONFIGS[name])
    return Qwen3VLConfig(**d, **SPECIAL)


def build_tiny(name: str, seed: int = 0):
    """A float32 HF model in eval mode with random weights at realistic activation scale.

    transformers' init (std 0.02) keeps every activation near zero, where a tanh-GELU is
    indistinguishable from an exact one and a misplaced norm barely moves the logits. Here matrices get
    std 1/sqrt(fan_in), embeddings std 1, norm weights 1 +- 0.2 and biases +-0.1, so that every
    component leaves a visible mark on the logits."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    torch.manual_seed(seed)
    cls = Qwen3VLMoeForConditionalGeneration if name in MOE_CONFIGS else Qwen3VLForConditionalGeneration
    model = cls(hf_config(name)).eval().to(torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embed_tokens" in pname or "pos_embed" in pname:
                p.copy_(torch.randn_like(p))
            elif ".experts." in pname:  # [experts, out, in]: each expert's fan-in is the last dim
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / fan_in ** 0.5)
    return model


def save_tiny(name: str, path, seed: int = 0, **save_kwargs):
    model = build_tiny(name, seed)
    model.save_pretrained(str(path), **save_kwargs)
    return model
