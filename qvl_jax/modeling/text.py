"""The Qwen3-VL text decoder as Flax NNX modules, attribute paths as transformers':
`language_model.layers[i].self_attn.q_proj`, `.q_norm`, `.mlp.gate_proj`, `language_model.norm`.

Grouped-query attention with per-head QK-norm, interleaved multimodal RoPE (3-D positions), SwiGLU
MLP, DeepStack injection after the first layers. The layers run as an unrolled loop.

Einsum letters: b batch, t query time, s key time, d model width, n query heads, k kv heads,
g query heads per kv head, h head_dim, f MLP width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qvl_jax.config import TextConfig
from qvl_jax.modeling import attention
from qvl_jax.modeling.layers import Embedding, Linear, RMSNorm, apply_rope, rope_inv_freq

def mrope_axis(head_dim: int, section: tuple[int, int, int]) -> np.ndarray:
    """Which position axis (0 = t, 1 = h, 2 = w) drives each of the head_dim/2 frequencies.

    Interleaved layout: frequency i is h when i % 3 == 1 and i < 3 * section[1], w when i % 3 == 2 and
    i < 3 * section[2], else t.
    """
    i = np.arange(head_dim // 2)
    axis = np.zeros_like(i)
    axis[(i % 3 == 1) & (i < 3 * section[1])] = 1
    axis[(i % 3 == 2) & (i < 3 * section[2])] = 2
    return axis


def mrope_cos_sin(positions: jax.Array, cfg: TextConfig) -> tuple[jax.Array, jax.Array]:
    """positions [3, b, t] (t, h, w) -> cos, sin [b, t, head_dim] in float32."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [3, b, t, h/2]
    axis = mrope_axis(cfg.head_dim, cfg.mrope_section)
    sel = jnp.where(axis == 0, freqs[0], jnp.where(axis == 1, freqs[1], freqs[2]))
    emb = jnp.concatenate([sel, sel], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """GQA attention of q [b, t, n, h] over k, v [b, s, k, h]; mask [b, t, s] True where allowed.
    Query head n uses kv head n // groups, as transformers' repeat_kv. Softmax in float32.
    Returns [b, t, n * h]."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    if t == 1 and b >= ONE_QUERY_MIN_ROWS:
        return _attend_one(q, k, v, mask)
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * (h ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n * h)


# From this many rows a one-query attention runs as `_attend_one`; below it the einsums are as fast or
# faster (batch 1 on the quick config: 0.31-0.37 ms a decode step with the einsums, 0.54-0.56 with
# `_attend_one` in the whole model; docs/performance.md, "What was tried").
ONE_QUERY_MIN_ROWS = 8


def _attend_one(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`attend` for one query token (a decode step), as products and sums rather than einsums: XLA
    CPU runs the einsums' many tiny batched matmuls (one per row and kv head) 3-6x slower than this
    fused multiply-reduce, which reads each key and value once (16 rows over a 512-token window:
    28.5 -> 4.4 ms per layer; docs/performance.md). Products are exact in float32 (as the einsum's
    float32 accumulation); the probabilities are cast to the activation dtype as there."""
    b, _, n, h = q.shape
    kv_heads, dt = k.shape[2], q.dtype
    q = q.reshape(b, 1, kv_heads, n // kv_heads, h).astype(jnp.float32)  # [b, 1, k, g, h]
    scores = jnp.sum(q * k.astype(dt).astype(jnp.float32)[:, :, :, None, :], axis=-1) * (h ** -0.5)  # [b, s, k, g]
    scores = jnp.where(mask[:, 0, :, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=1).astype(dt).astype(jnp.float32)
    out = jnp.sum(probs[..., None] * v.astype(dt).astype(jnp.float32)[:, :, :, None, :], axis=1)  # [b, k, g, h]
    return out.astype(dt).reshape(b, 1, n * h)


class TextAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs, dtype=jnp.float32):
        D, H, KV, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = Linear(D, H * hd, bias=bias, axes=("heads", "embed"), units=(hd, 1), rngs=rngs, dtype=dtype)
        self.k_proj = Linear(D, KV * hd, bias=bias, axes=("kv_heads", "embed"), units=(hd, 1), rngs=rngs, dtype=dtype)
        self.v_proj = Linear(D, KV * hd, bias=bias, axes=("kv_heads", "embed"), units=(hd, 1), rngs=rngs, dtype=dtype)
        self.o_proj = Linear(H * hd, D, bias=bias, axes=("embed", "heads"), units=(1, hd), rngs=rngs, dtype=dtype)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, axes=("head_dim",), dtype=dtype)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, axes=("head_dim",), dtype=dtype)
        self.heads, self.kv_heads, self.head_dim = H, KV, hd

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """Queries [b, t, n, h] and keys/values [b, t, k, h]: projections, per-head QK-norm, then MRoPE."""
        hd = self.head_dim
        q = self.q_norm(self.q_proj(x, (self.heads, hd)))
        k = self.k_norm(self.k_proj(x, (self.kv_heads, hd)))
        v = self.v_proj(x, (self.kv_heads, hd))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str = "einsum") -> jax.Array:
        """Attention of q over k, v (mask [b, t, s]) through o_proj. impl: the kernel (see
        qvl_jax.modeling.attention); "einsum" is the one written out above."""
        if impl != "einsum":
            b, t, n, h = q.shape
            return self.o_proj(attention.fused(q, k, v, impl, mask=mask).reshape(b, t, n * h))
        return self.o_proj(attend(q, k, v, mask))


class TextMLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs, dtype=jnp.float32):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(D, F, bias=False, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.up_proj = Linear(D, F, bias=False, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.down_proj = Linear(F, D, bias=False, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs, dtype=jnp.float32):
        self.self_attn = TextAttention(cfg, rngs=rngs, dtype=dtype)
        self.mlp = TextMLP(cfg, rngs=rngs, dtype=dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, axes=("embed",), dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, axes=("embed",), dtype=dtype)


class TextModel(nnx.Module):
    """Embedding, decoder layers and the final norm (transformers' Qwen3VLTextModel)."""

    def __init__(self, cfg: TextConfig, *, rngs, dtype=jnp.float32):
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), rngs=rngs, dtype=dtype)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, axes=("embed",), dtype=dtype)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, deepstack: jax.Array | None = None,
                 cache: tuple[jax.Array, jax.Array] | None = None, write_pos: jax.Array | None = None,
                 read_len: int | None = None, remat: bool = False):
        """All decoder layers and the final norm: (hidden [b, t, d], updated cache or None).

        x [b, t, d] input embeddings; positions [3, b, t]; deepstack [n, b, t, d]: visual features
        already placed at their token positions (zero elsewhere), entry i added right after layer i.

        Without a cache, attention is over this call's own tokens and mask is [b, t, t]. With a cache
        (k, v [layers, b, max_len, kv_heads, head_dim]) this call's keys and values are written at
        `write_pos` (shared by the batch) and attention reads the first `read_len` (static) cache
        entries: mask is [b, t, read_len]. A cache may also be any object with
        `write_and_read(layer, k, v) -> (keys, values, cache)` (keys [b, s, kv_heads, head_dim], what
        attention reads; mask [b, t, s]): the engine's paged cache plugs in that way. Such a cache may
        also have `fused_attention(layer, q, k, v) -> (out [b, t, heads, head_dim], cache) | None`
        to run attention with its own kernel (None: it does not, for this call).

        remat (no cache: training): each layer's activations are recomputed in the backward pass
        instead of kept, so activation memory holds one layer's rather than every layer's."""
        cfg = self.config
        cos, sin = mrope_cos_sin(positions, cfg)
        n_ds = 0 if deepstack is None else deepstack.shape[0]
        impl = attention.kernel(x.dtype) if x.shape[1] > 1 else "einsum"  # a decode step has no scores to fuse
        # An unrolled loop over separate per-layer arrays: slicing a layer out of stacked weights
        # (what lax.scan does) made XLA copy the slice before every matmul, which tripled the weight
        # traffic of a CPU decode step (docs/performance.md).
        for i, layer in enumerate(self.layers):
            if remat and cache is None:
                # jax.checkpoint over the layer's state as a pure function (nnx.remat tried to write
                # Variables back across trace levels once LoRA Params were in the layer).
                graphdef, state = nnx.split(layer)
                x = jax.checkpoint(lambda st, *a: _layer_no_cache(nnx.merge(graphdef, st), *a, impl))(
                    state, x, cos, sin, mask)
                if i < n_ds:
                    x = x + deepstack[i].astype(x.dtype)
                continue
            q, k, v = layer.self_attn.qkv(layer.input_layernorm(x), cos, sin)
            fused = cache.fused_attention(i, q, k, v) if hasattr(cache, "fused_attention") else None
            if fused is not None:  # the cache's own kernel attended (the engine's Pallas decode)
                o, cache = fused
                x = x + layer.self_attn.o_proj(o.reshape(*o.shape[:2], -1))
            else:
                if cache is not None and hasattr(cache, "write_and_read"):  # another layout (the engine's pages)
                    k, v, cache = cache.write_and_read(i, k, v)
                elif cache is not None:
                    ck, cv = cache
                    at = (i, 0, write_pos, 0, 0)
                    ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), at)
                    cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), at)
                    k = ck[i, :, :read_len]
                    v = cv[i, :, :read_len]
                    cache = (ck, cv)
                x = x + layer.self_attn.out(q, k, v, mask, impl)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if i < n_ds:
                x = x + deepstack[i].astype(x.dtype)
        return self.norm(x), cache


def _layer_no_cache(layer: DecoderLayer, x, cos, sin, mask, impl: str):
    """One decoder layer without a cache (what TextModel runs per layer under remat)."""
    q, k, v = layer.self_attn.qkv(layer.input_layernorm(x), cos, sin)
    x = x + layer.self_attn.out(q, k, v, mask, impl)
    return x + layer.mlp(layer.post_attention_layernorm(x))
