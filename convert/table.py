"""The key table: every Hugging Face Qwen3-VL tensor name, with the shape the config implies.

The converted params keep Hugging Face's keys, shapes and layouts (Linear `weight` [out, in], the
Conv3d patch embedding [out, C, T, P, P]): they are the model's NNX state paths
(qvl_jax.modeling.model), whose only deviation is a tied lm_head, which is checked and never stored.
So conversion is validation (every key known, present once, of its shape and a float dtype), a
dtype cast and the tie check. One `Rule` per tensor.

The one exception is the fused expert tensors of the Mixture-of-Experts models, whose layout
changed between transformers releases: released checkpoints and transformers 4.x store
`mlp.experts.gate_up_proj` [experts, d, 2f] and `down_proj` [experts, f, d] ("in_out"),
transformers 5 stores [experts, 2f, d] and [experts, d, f] ("out_in", the model's layout). One
tensor's shape cannot tell them apart when d == 2f (gate_up_proj) or d == f (down_proj), so
`expert_layout` judges all of them together (both cannot be square at once), takes what the
checkpoint declares (its safetensors metadata, else the transformers version in its config.json),
and refuses a checkpoint whose declaration and shapes disagree, or whose tensors mix the layouts.
"""

from __future__ import annotations

import dataclasses
import re

from qvl_jax.config import Qwen3VLConfig
from qvl_jax.errors import CheckpointError

Shape = tuple[int, ...]

# The two layouts of the fused expert tensors (see the module docstring).
OUT_IN, IN_OUT = "out_in", "in_out"
EXPERT_LAYOUTS = (OUT_IN, IN_OUT)
# The safetensors metadata key qvl_jax writes (save_pretrained, tiny-random-moe) to declare it.
LAYOUT_METADATA = "expert_layout"


@dataclasses.dataclass(frozen=True)
class Rule:
    """One checkpoint tensor: its key (kept as the target key) and the shape the config implies."""

    pattern: str
    src_shape: Shape
    swap: tuple[int, int] | None = None  # the source holds these two dims the other way round

    @property
    def target(self) -> str:
        return self.pattern

    @property
    def target_shape(self) -> Shape:
        if self.swap is None:
            return self.src_shape
        shape = list(self.src_shape)
        a, b = self.swap
        shape[a], shape[b] = shape[b], shape[a]
        return tuple(shape)

    def source_keys(self) -> list[str]:
        return [self.pattern]


def expert_shapes(cfg: Qwen3VLConfig, layout: str) -> dict[str, Shape]:
    """The source shapes of one sparse layer's expert tensors (name under the layer -> shape)."""
    t = cfg.text
    E, D, F = t.num_experts, t.hidden_size, t.moe_intermediate_size
    if layout == OUT_IN:
        return {"mlp.experts.gate_up_proj": (E, 2 * F, D), "mlp.experts.down_proj": (E, D, F)}
    return {"mlp.experts.gate_up_proj": (E, D, 2 * F), "mlp.experts.down_proj": (E, F, D)}


def declared_layout(metadata: list[dict], config_json: dict) -> tuple[str | None, str]:
    """(the expert layout a checkpoint declares or None, where that came from): the safetensors
    metadata's `expert_layout` (every file must agree), else config.json's transformers_version
    (5 and later write out_in, earlier ones in_out)."""
    declared = {m[LAYOUT_METADATA] for m in metadata if m and LAYOUT_METADATA in m}
    if len(declared) > 1:
        raise CheckpointError(f"the checkpoint's files declare different expert layouts: {sorted(declared)}")
    if declared:
        (layout,) = declared
        if layout not in EXPERT_LAYOUTS:
            raise CheckpointError(f"the checkpoint's metadata declares expert_layout={layout!r}; expected one of "
                                  f"{', '.join(EXPERT_LAYOUTS)}")
        return layout, "its safetensors metadata"
    version = config_json.get("transformers_version")
    match = re.match(r"^(\d+)\.", version) if isinstance(version, str) else None
    if match:
        return (OUT_IN if int(match.group(1)) >= 5 else IN_OUT), f"config.json's transformers_version {version}"
    return None, "nothing"


def expert_layout(cfg: Qwen3VLConfig, shapes: dict[str, Shape], metadata: list[dict], config_json: dict) -> str:
    """The layout of a MoE checkpoint's expert tensors (shapes: every source key -> shape)."""
    sparse = [i for i in range(cfg.text.num_hidden_layers) if cfg.text.is_sparse(i)]
    fits = set(EXPERT_LAYOUTS)
    for layout in EXPERT_LAYOUTS:
        for i in sparse:
            for name, shape in expert_shapes(cfg, layout).items():
                key = f"model.language_model.layers.{i}.{name}"
                if key in shapes and shapes[key] != shape:
                    fits.discard(layout)
    declared, source = declared_layout(metadata, config_json)
    if declared is not None:
        if declared not in fits and fits:
            raise CheckpointError(f"{source} implies the {declared} expert layout, but the expert tensors' shapes "
                                  f"are those of the {fits.pop()} layout: refusing to guess which is right")
        return declared  # (fitting neither: the shape check names the tensor)
    if len(fits) == 1:
        return fits.pop()
    return OUT_IN  # no expert tensor to judge by, or none fits: the plan's checks name what is wrong


def rules_for(cfg: Qwen3VLConfig, expert_layout: str = OUT_IN) -> list[Rule]:
    """Every tensor of a checkpoint of this config; a MoE model's expert tensors as stored in
    `expert_layout` (the target is always out_in, the model's layout)."""
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
    attn, dense_mlp, bias = layer[:8], layer[8:11], layer[11:]
    swap = None if expert_layout == OUT_IN else (1, 2)
    rules = [Rule(lm + "embed_tokens.weight", (t.vocab_size, D)), Rule(lm + "norm.weight", (D,))]
    for i in range(L):
        p = f"{lm}layers.{i}."
        rules += [Rule(p + name, shape) for name, shape in attn]
        if t.is_sparse(i):
            rules.append(Rule(p + "mlp.gate.weight", (t.num_experts, D)))
            rules += [Rule(p + name, shape, swap) for name, shape in expert_shapes(cfg, expert_layout).items()]
        else:
            rules += [Rule(p + name, shape) for name, shape in dense_mlp]
        rules += [Rule(p + name, shape) for name, shape in bias]
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
