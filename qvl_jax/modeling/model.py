"""The whole model as one Flax NNX module, transformers' Qwen3VLForConditionalGeneration: embed ->
splice vision features at placeholder tokens -> decoder (DeepStack at visual positions) -> lm_head.

Its flattened Param state holds Hugging Face's keys and shapes (`PARAM_DEVIATIONS` lists the
exceptions), so a converted checkpoint loads by name. Used functionally: `nnx.split` once, jitted
pure functions take the split (`Structure`, static, and the state's arrays) and `nnx.merge` inside
the trace, where merging costs nothing at run time (`forward_logits`, `vision_tower`; the engine's
prefill and decode do the same).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from qvl_jax.config import Qwen3VLConfig
from qvl_jax.modeling.layers import Linear
from qvl_jax.modeling.text import TextModel
from qvl_jax.modeling.vision import VisionInputs, VisionModel

# Where the Param state differs from the Hugging Face checkpoint (state path -> reason). Everything
# else is the HF key, shape and values.
PARAM_DEVIATIONS = {
    "lm_head.weight": "absent when tie_word_embeddings: the lm_head is the embedding matrix, never held twice",
}


class Qwen3VLModel(nnx.Module):
    def __init__(self, cfg: Qwen3VLConfig, *, rngs, dtype=jnp.float32):
        self.visual = VisionModel(cfg.vision, rngs=rngs, dtype=dtype)
        self.language_model = TextModel(cfg.text, rngs=rngs, dtype=dtype)


class Qwen3VLForConditionalGeneration(nnx.Module):
    """`Qwen3VLForConditionalGeneration(config, rngs=nnx.Rngs(0))` builds a model with random
    weights (std 1/sqrt(fan_in), norms one, biases zero); `qvl_jax.load` fills one from a checkpoint."""

    def __init__(self, cfg: Qwen3VLConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = cfg
        self.model = Qwen3VLModel(cfg, rngs=rngs, dtype=dtype)
        t = cfg.text
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            t.hidden_size, t.vocab_size, bias=False, axes=("vocab", "embed"), rngs=rngs, dtype=dtype)

    def embed(self, ids: jax.Array) -> jax.Array:
        return self.model.language_model.embed_tokens(ids)

    def lm_logits(self, h: jax.Array) -> jax.Array:
        if self.lm_head is None:
            return self.model.language_model.embed_tokens.attend(h)
        return self.lm_head(h)

    def embed_inputs(self, input_ids: jax.Array, vision: tuple | None, lookup=None):
        """Token embeddings with vision features spliced in, and the per-token DeepStack features.

        vision: (features [n, d], deepstack [K, n, d], feat_index [b, t]: the feature row of each
        placeholder token, -1 for every other token) or None. lookup: ids -> their embeddings, in
        place of `embed` (the engine's CPU kernel)."""
        x = (lookup or self.embed)(input_ids)
        if vision is None:
            return x, None
        feats, deepstack, feat_index = vision
        x = splice_vision(x, feat_index, feats)
        return x, (deepstack_at_tokens(deepstack, feat_index).astype(x.dtype) if deepstack.shape[0] else None)

    def __call__(self, input_ids: jax.Array, positions: jax.Array, valid: jax.Array,
                 vision: tuple | None = None, remat: bool = False) -> jax.Array:
        """Full-prompt forward: logits [b, t, vocab] in float32. positions [3, b, t]; valid [b, t]
        marks real tokens; remat: recompute each decoder layer in the backward pass (training)."""
        x, deepstack = self.embed_inputs(input_ids, vision)
        h, _ = self.model.language_model(x, positions, causal_mask(valid), deepstack=deepstack, remat=remat)
        return self.lm_logits(h).astype(jnp.float32)


def set_attention(module: Qwen3VLForConditionalGeneration, kernel: str) -> None:
    """Switches a model's attention kernel (`qvl_jax.modeling.attention`): the configs its modules
    hold, which are static parts of its graphdef, so that jitted functions compile for it."""
    cfg = module.config.with_attention(kernel)
    module.config = cfg
    module.model.language_model.config = cfg.text
    module.model.visual.config = cfg.vision


def set_moe_impl(module: Qwen3VLForConditionalGeneration, impl: str) -> None:
    """Switches how a Mixture-of-Experts model computes its experts (`qvl_jax.modeling.moe`): the
    config and each sparse block's setting, static parts of the graphdef, so jitted functions
    compile for it."""
    cfg = module.config.with_moe_impl(impl)
    module.config = cfg
    module.model.language_model.config = cfg.text
    for layer in module.model.language_model.layers:
        if hasattr(layer.mlp, "impl"):
            layer.mlp.impl = impl


def splice_vision(x: jax.Array, feat_index: jax.Array, feats: jax.Array) -> jax.Array:
    """Replaces the embedding of each vision placeholder token by its feature row."""
    rows = jnp.take(feats, jnp.maximum(feat_index, 0), axis=0).astype(x.dtype)
    return jnp.where(feat_index[..., None] >= 0, rows, x)


def deepstack_at_tokens(deepstack: jax.Array, feat_index: jax.Array) -> jax.Array:
    """[K, n_feats, d] DeepStack features -> [K, b, t, d], zero away from vision tokens."""
    rows = jnp.take(deepstack, jnp.maximum(feat_index, 0), axis=1)
    return jnp.where(feat_index[None, ..., None] >= 0, rows, jnp.zeros_like(rows))


def causal_mask(valid: jax.Array) -> jax.Array:
    """valid [b, t] -> [b, t, t]: query i sees key j when j <= i and j is a real token."""
    t = valid.shape[1]
    return jnp.tril(jnp.ones((t, t), dtype=bool))[None] & valid[:, None, :]


def abstract_model(cfg: Qwen3VLConfig, dtype=jnp.float32) -> Qwen3VLForConditionalGeneration:
    """The module with ShapeDtypeStruct leaves: names, shapes and dtypes, no memory."""
    return nnx.eval_shape(lambda: Qwen3VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0), dtype=dtype))


def state_key(path: tuple) -> str:
    """A state path ('model', 'visual', 'blocks', 0, 'attn', 'qkv', 'weight') as its HF key."""
    return ".".join(str(p) for p in path)


class Structure:
    """The static half of a split model as jitted functions take it: the graphdef and the treedef
    of its state, hashed once. (jit hashes static arguments on every call: an nnx.GraphDef took
    0.4 ms to hash, and flattening the nnx.State another 0.1 ms per hundred params, which tripled
    the host time of a streamed decode step; a list of arrays flattens in microseconds.)"""

    __slots__ = ("graphdef", "treedef", "_hash")

    def __init__(self, graphdef: nnx.GraphDef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, Structure) and self._hash == other._hash
                                 and self.graphdef == other.graphdef and self.treedef == other.treedef)

    def merge(self, leaves: list) -> Qwen3VLForConditionalGeneration:
        """The module over these arrays (inside a trace: free at run time)."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


def split(graphdef: nnx.GraphDef, state: nnx.State) -> tuple[Structure, list]:
    """(Structure, leaves): what the jitted functions take for a (graphdef, state) pair."""
    leaves, treedef = jax.tree.flatten(state)
    return Structure(graphdef, treedef), leaves


@functools.partial(jax.jit, static_argnames=("structure",))
def forward_logits(structure: Structure, leaves: list, input_ids: jax.Array, positions: jax.Array,
                   valid: jax.Array, vision: tuple | None = None) -> jax.Array:
    return structure.merge(leaves)(input_ids, positions, valid, vision)


@functools.partial(jax.jit, static_argnames=("structure", "packed"))
def _vision_tower(structure, leaves, patches, pos_idx, pos_w, rope_pos, frame, merged_order, packed: bool):
    return structure.merge(leaves).model.visual(patches, pos_idx, pos_w, rope_pos, frame, merged_order, packed)


def vision_tower(structure: Structure, leaves: list, vis: VisionInputs) -> tuple[jax.Array, jax.Array]:
    """Merged features [bucket / m^2, d] and DeepStack features [K, bucket / m^2, d] of all images and
    videos of one call, in Hugging Face's token order (padding rows last)."""
    # The host arrays go to the jitted call as they are: jnp.asarray would first compile a copy
    # program for each new shape.
    return _vision_tower(structure, leaves, vis.patches, vis.pos_idx, vis.pos_w, vis.rope_pos, vis.frame,
                         vis.merged_order, packed=vis.packed)
