"""The key table: every Hugging Face Qwen3-VL tensor name, with the shape the config implies.

The converted params keep Hugging Face's keys, shapes and layouts (Linear `weight` [out, in], the
Conv3d patch embedding [out, C, T, P, P]): they are the model's NNX state paths
(qvl_jax.modeling.model), whose only deviation is a tied lm_head, which is checked and never stored.
So conversion is validation (every key known, present once, of its shape and a float dtype), a
dtype cast and the tie check. One `Rule` per tensor.
"""

from __future__ import annotations

import dataclasses

from qvl_jax.config import Qwen3VLConfig

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One checkpoint tensor: its key (kept as the target key) and the shape the config implies."""

    pattern: str
    src_shape: Shape

    @property
    def target(self) -> str:
        return self.pattern

    @property
    def target_shape(self) -> Shape:
        return self.src_shape

    def source_keys(self) -> list[str]:
        return [self.pattern]


def rules_for(cfg: Qwen3VLConfig) -> list[Rule]:
    t, v = cfg.text, cfg.vision
    D, F, L = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    H, KV, hd = t.num_attention_heads, t.num_key_value_heads, t.head_dim
    lm = "model.language_model."

    def each(n: int, prefix: str, table: list[tuple[str, Shape]]) -> list[Rule]:
        return [Rule(f"{prefix}{i}.{name}", shape) for i in range(n) for name, shape in table]

    layer = [
        ("input_layernorm.weight", (D,)),
        ("post_attention_layernorm.weight", (D,)),
        ("self_attn.q_proj.weight", (H * hd, D)),
        ("self_attn.k_proj.weight", (KV * hd, D)),
        ("self_attn.v_proj.weight", (KV * hd, D)),
        ("self_attn.o_proj.weight", (D, H * hd)),
        ("self_attn.q_norm.weight", (hd,)),
        ("self_attn.k_norm.weight", (hd,)),
        ("mlp.gate_proj.weight", (F, D)),
        ("mlp.up_proj.weight", (F, D)),
        ("mlp.down_proj.weight", (D, F)),
    ]
    if t.attention_bias:
        layer += [("self_attn.q_proj.bias", (H * hd,)), ("self_attn.k_proj.bias", (KV * hd,)),
                  ("self_attn.v_proj.bias", (KV * hd,)), ("self_attn.o_proj.bias", (D,))]
    rules = [Rule(lm + "embed_tokens.weight", (t.vocab_size, D)), Rule(lm + "norm.weight", (D,))]
    rules += each(L, lm + "layers.", layer)
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", (t.vocab_size, D)))

    Dv, Fv, Lv = v.hidden_size, v.intermediate_size, v.depth
    Dm = Dv * v.spatial_merge_size ** 2  # width after merging spatial_merge_size**2 patches
    vis = "model.visual."
    rules += [
        Rule(vis + "patch_embed.proj.weight", (Dv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)),
        Rule(vis + "patch_embed.proj.bias", (Dv,)),
        Rule(vis + "pos_embed.weight", (v.num_position_embeddings, Dv)),
    ]
    rules += each(Lv, vis + "blocks.", [
        ("norm1.weight", (Dv,)), ("norm1.bias", (Dv,)), ("norm2.weight", (Dv,)), ("norm2.bias", (Dv,)),
        ("attn.qkv.weight", (3 * Dv, Dv)), ("attn.qkv.bias", (3 * Dv,)),
        ("attn.proj.weight", (Dv, Dv)), ("attn.proj.bias", (Dv,)),
        ("mlp.linear_fc1.weight", (Fv, Dv)), ("mlp.linear_fc1.bias", (Fv,)),
        ("mlp.linear_fc2.weight", (Dv, Fv)), ("mlp.linear_fc2.bias", (Dv,)),
    ])
    merger = [("linear_fc1.weight", (Dm, Dm)), ("linear_fc1.bias", (Dm,)),
              ("linear_fc2.weight", (v.out_hidden_size, Dm)), ("linear_fc2.bias", (v.out_hidden_size,))]
    # The main merger normalises each patch (width Dv) before grouping; the DeepStack mergers
    # normalise the grouped vector (width Dm).
    rules += [Rule(f"{vis}merger.{name}", shape)
              for name, shape in [("norm.weight", (Dv,)), ("norm.bias", (Dv,))] + merger]
    rules += each(len(v.deepstack_visual_indexes), vis + "deepstack_merger_list.",
                  [("norm.weight", (Dm,)), ("norm.bias", (Dm,))] + merger)
    return rules


# Keys a tied checkpoint may still carry: checked against the embedding, never stored.
TIED_LM_HEAD = "lm_head.weight"
TIED_SOURCE = "model.language_model.embed_tokens.weight"
