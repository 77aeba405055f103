"""The key table: every Hugging Face Qwen3-VL tensor name, where it goes in our param tree, and how.

One `Rule` per HF parameter pattern. A rule knows the source shape it expects (from the config), the
transform that turns the HF layout into ours, and, for per-layer weights, how many layers stack into
one array with a leading layer axis (so the decoder and the vision tower can be `lax.scan`ned).

Target layout conventions: Linear weights keep Hugging Face's `[out, in]` layout under the leaf name
`weight` (not flax's `kernel [in, out]`: XLA CPU runs x @ W.T over an [out, in] matrix 1.2-1.8x faster
at the small row counts of decode and short prefill, and no slower at large ones; see
docs/design-notes.md). Attention heads are split out of the out/in axes (a reshape, no data moves) so
that sharding rules can name the head axis:
  Linear  -> weight [out, in] (+ bias)          q/k/v_proj weight [heads, head_dim, D]
  o_proj  -> weight [D, heads, head_dim]        vision qkv weight [3, heads, head_dim, D]
  RMSNorm -> scale                              LayerNorm -> scale, bias
  Embedding -> embedding                        Conv3d patch embed -> weight [D, C*T*P*P] (a matmul)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from qvl_jax.config import Qwen3VLConfig

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    """A layout change: `shape` maps the source shape to the target shape, `apply` moves the data."""

    name: str
    shape: Callable[[Shape], Shape]
    apply: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda s: s, lambda a: a)


def to_heads(n: int, hd: int) -> Transform:
    """[n*hd, in] Linear weight -> [n, hd, in]."""
    return Transform(f"to_heads({n},{hd})", lambda s: (n, hd, s[1]), lambda a: a.reshape(n, hd, a.shape[1]))


def bias_to_heads(n: int, hd: int) -> Transform:
    return Transform(f"bias_to_heads({n},{hd})", lambda s: (n, hd), lambda a: a.reshape(n, hd))


def from_heads(n: int, hd: int) -> Transform:
    """[out, n*hd] Linear weight -> [out, n, hd]."""
    return Transform(f"from_heads({n},{hd})", lambda s: (s[0], n, hd), lambda a: a.reshape(a.shape[0], n, hd))


def qkv_to_heads(n: int, hd: int) -> Transform:
    """Fused [3*n*hd, in] qkv weight -> [3, n, hd, in]; HF splits it as reshape(3, heads, head_dim)."""
    return Transform(f"qkv_to_heads({n},{hd})", lambda s: (3, n, hd, s[1]),
                     lambda a: a.reshape(3, n, hd, a.shape[1]))


def qkv_bias_to_heads(n: int, hd: int) -> Transform:
    return Transform(f"qkv_bias_to_heads({n},{hd})", lambda s: (3, n, hd), lambda a: a.reshape(3, n, hd))


# Conv3d with stride == kernel over a patch already flattened as (C, T, P, P) is a matmul with the
# weight flattened the same way.
CONV3D_TO_MATMUL = Transform(
    "conv3d_to_matmul",
    lambda s: (s[0], int(np.prod(s[1:]))),
    lambda a: a.reshape(a.shape[0], -1),
)


@dataclasses.dataclass(frozen=True)
class Rule:
    """HF key pattern -> target key. `pattern` may contain one `{i}` (the stacking index)."""

    pattern: str
    target: str
    src_shape: Shape
    transform: Transform = IDENTITY
    count: int | None = None  # number of stacked entries ({i} in 0..count-1); None: a single tensor

    @property
    def regex(self) -> re.Pattern:
        return re.compile(re.escape(self.pattern).replace(re.escape("{i}"), r"(\d+)") + r"\Z")

    def source_keys(self) -> list[str]:
        if self.count is None:
            return [self.pattern]
        return [self.pattern.replace("{i}", str(i)) for i in range(self.count)]

    @property
    def target_shape(self) -> Shape:
        base = self.transform.shape(self.src_shape)
        return base if self.count is None else (self.count, *base)


def rules_for(cfg: Qwen3VLConfig) -> list[Rule]:
    t, v = cfg.text, cfg.vision
    D, F, L = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    H, KV, hd = t.num_attention_heads, t.num_key_value_heads, t.head_dim
    lm = "model.language_model."
    tl = "model/language_model/"
    layer = lm + "layers.{i}."
    tlayer = tl + "layers/"

    rules = [
        Rule(lm + "embed_tokens.weight", tl + "embed_tokens/embedding", (t.vocab_size, D)),
        Rule(lm + "norm.weight", tl + "norm/scale", (D,)),
        Rule(layer + "input_layernorm.weight", tlayer + "input_layernorm/scale", (D,), count=L),
        Rule(layer + "post_attention_layernorm.weight", tlayer + "post_attention_layernorm/scale", (D,), count=L),
        Rule(layer + "self_attn.q_proj.weight", tlayer + "self_attn/q_proj/weight", (H * hd, D), to_heads(H, hd), L),
        Rule(layer + "self_attn.k_proj.weight", tlayer + "self_attn/k_proj/weight", (KV * hd, D), to_heads(KV, hd), L),
        Rule(layer + "self_attn.v_proj.weight", tlayer + "self_attn/v_proj/weight", (KV * hd, D), to_heads(KV, hd), L),
        Rule(layer + "self_attn.o_proj.weight", tlayer + "self_attn/o_proj/weight", (D, H * hd), from_heads(H, hd), L),
        Rule(layer + "self_attn.q_norm.weight", tlayer + "self_attn/q_norm/scale", (hd,), count=L),
        Rule(layer + "self_attn.k_norm.weight", tlayer + "self_attn/k_norm/scale", (hd,), count=L),
        Rule(layer + "mlp.gate_proj.weight", tlayer + "mlp/gate_proj/weight", (F, D), count=L),
        Rule(layer + "mlp.up_proj.weight", tlayer + "mlp/up_proj/weight", (F, D), count=L),
        Rule(layer + "mlp.down_proj.weight", tlayer + "mlp/down_proj/weight", (D, F), count=L),
    ]
    if t.attention_bias:
        rules += [
            Rule(layer + "self_attn.q_proj.bias", tlayer + "self_attn/q_proj/bias", (H * hd,), bias_to_heads(H, hd), L),
            Rule(layer + "self_attn.k_proj.bias", tlayer + "self_attn/k_proj/bias", (KV * hd,), bias_to_heads(KV, hd), L),
            Rule(layer + "self_attn.v_proj.bias", tlayer + "self_attn/v_proj/bias", (KV * hd,), bias_to_heads(KV, hd), L),
            Rule(layer + "self_attn.o_proj.bias", tlayer + "self_attn/o_proj/bias", (D,), count=L),
        ]
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", "lm_head/weight", (t.vocab_size, D)))

    Dv, Fv, Lv, Hv, hdv = v.hidden_size, v.intermediate_size, v.depth, v.num_heads, v.head_dim
    Dm = Dv * v.spatial_merge_size ** 2  # width after merging spatial_merge_size**2 patches
    K = len(v.deepstack_visual_indexes)
    vis = "model.visual."
    tv = "model/visual/"
    blk = vis + "blocks.{i}."
    tblk = tv + "blocks/"
    rules += [
        Rule(vis + "patch_embed.proj.weight", tv + "patch_embed/proj/weight",
             (Dv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size), CONV3D_TO_MATMUL),
        Rule(vis + "patch_embed.proj.bias", tv + "patch_embed/proj/bias", (Dv,)),
        Rule(vis + "pos_embed.weight", tv + "pos_embed/embedding", (v.num_position_embeddings, Dv)),
        Rule(blk + "norm1.weight", tblk + "norm1/scale", (Dv,), count=Lv),
        Rule(blk + "norm1.bias", tblk + "norm1/bias", (Dv,), count=Lv),
        Rule(blk + "norm2.weight", tblk + "norm2/scale", (Dv,), count=Lv),
        Rule(blk + "norm2.bias", tblk + "norm2/bias", (Dv,), count=Lv),
        Rule(blk + "attn.qkv.weight", tblk + "attn/qkv/weight", (3 * Dv, Dv), qkv_to_heads(Hv, hdv), Lv),
        Rule(blk + "attn.qkv.bias", tblk + "attn/qkv/bias", (3 * Dv,), qkv_bias_to_heads(Hv, hdv), Lv),
        Rule(blk + "attn.proj.weight", tblk + "attn/proj/weight", (Dv, Dv), from_heads(Hv, hdv), Lv),
        Rule(blk + "attn.proj.bias", tblk + "attn/proj/bias", (Dv,), count=Lv),
        Rule(blk + "mlp.linear_fc1.weight", tblk + "mlp/linear_fc1/weight", (Fv, Dv), count=Lv),
        Rule(blk + "mlp.linear_fc1.bias", tblk + "mlp/linear_fc1/bias", (Fv,), count=Lv),
        Rule(blk + "mlp.linear_fc2.weight", tblk + "mlp/linear_fc2/weight", (Dv, Fv), count=Lv),
        Rule(blk + "mlp.linear_fc2.bias", tblk + "mlp/linear_fc2/bias", (Dv,), count=Lv),
        # Main merger: LayerNorm over the per-patch width *before* grouping patches.
        Rule(vis + "merger.norm.weight", tv + "merger/norm/scale", (Dv,)),
        Rule(vis + "merger.norm.bias", tv + "merger/norm/bias", (Dv,)),
        Rule(vis + "merger.linear_fc1.weight", tv + "merger/linear_fc1/weight", (Dm, Dm)),
        Rule(vis + "merger.linear_fc1.bias", tv + "merger/linear_fc1/bias", (Dm,)),
        Rule(vis + "merger.linear_fc2.weight", tv + "merger/linear_fc2/weight", (v.out_hidden_size, Dm)),
        Rule(vis + "merger.linear_fc2.bias", tv + "merger/linear_fc2/bias", (v.out_hidden_size,)),
    ]
    if K:
        ds = vis + "deepstack_merger_list.{i}."
        tds = tv + "deepstack_merger_list/"
        rules += [
            # DeepStack mergers normalise the grouped (4x wider) vector instead.
            Rule(ds + "norm.weight", tds + "norm/scale", (Dm,), count=K),
            Rule(ds + "norm.bias", tds + "norm/bias", (Dm,), count=K),
            Rule(ds + "linear_fc1.weight", tds + "linear_fc1/weight", (Dm, Dm), count=K),
            Rule(ds + "linear_fc1.bias", tds + "linear_fc1/bias", (Dm,), count=K),
            Rule(ds + "linear_fc2.weight", tds + "linear_fc2/weight", (v.out_hidden_size, Dm), count=K),
            Rule(ds + "linear_fc2.bias", tds + "linear_fc2/bias", (v.out_hidden_size,), count=K),
        ]
    return rules


# Keys a tied checkpoint may still carry: checked against the embedding, never stored.
TIED_LM_HEAD = "lm_head.weight"
TIED_SOURCE = "model.language_model.embed_tokens.weight"
