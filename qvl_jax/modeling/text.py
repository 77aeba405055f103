"""The Qwen3-VL text decoder as Flax NNX modules, attribute paths as transformers':
`language_model.layers[i].self_attn.q_proj`, `.q_norm`, `.mlp.gate_proj`, `language_model.norm`.

Grouped-query attention with per-head QK-norm, interleaved multimodal RoPE (3-D positions), SwiGLU
MLP (or, in the sparse layers of a Mixture-of-Experts config, `qvl_jax.modeling.moe`'s expert MLP
at the same path `.mlp`), DeepStack injection after the first layers. The layers run as an
unrolled loop.

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
from qvl_jax.modeling.kv_cache import KVCache
from qvl_jax.modeling.layers import Embedding, Linear, RMSNorm, apply_rope, rope_inv_freq, silu
from qvl_jax.modeling.moe import SparseMoeBlock


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


class TextMLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs, dtype=jnp.float32):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(D, F, bias=False, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.up_proj = Linear(D, F, bias=False, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.down_proj = Linear(F, D, bias=False, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs, dtype=jnp.float32, index: int = 0):
        self.self_attn = TextAttention(cfg, rngs=rngs, dtype=dtype)
        mlp = SparseMoeBlock if cfg.is_sparse(index) else TextMLP
        self.mlp = mlp(cfg, rngs=rngs, dtype=dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, axes=("embed",), dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, axes=("embed",), dtype=dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, impl: str = "einsum",
                 cache: KVCache | None = None, index: int = 0) -> tuple[jax.Array, KVCache | None]:
        """(x after this layer, the updated cache). Attention is over this call's own tokens (cache
        None; mask [b, t, t]) or through `cache`, which stores this call's keys and values as layer
        `index` and attends over what it holds (mask [b, t, s]). impl: `attention.implementation`."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), cos, sin)
        if cache is None:
            o = attention.attend(q, k, v, mask, impl)
        else:
            o, cache = cache.attend(index, q, k, v, mask, impl)
        x = x + self.self_attn.o_proj(o)
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class TextModel(nnx.Module):
    """Embedding, decoder layers and the final norm (transformers' Qwen3VLTextModel)."""

    def __init__(self, cfg: TextConfig, *, rngs, dtype=jnp.float32):
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), rngs=rngs, dtype=dtype)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, dtype=dtype, index=i)
                                 for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, axes=("embed",), dtype=dtype)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, deepstack: jax.Array | None = None,
                 cache: KVCache | None = None, remat: bool = False) -> tuple[jax.Array, KVCache | None]:
        """All decoder layers and the final norm: (hidden [b, t, d], the updated cache or None).

        x [b, t, d] input embeddings; positions [3, b, t]; deepstack [n, b, t, d]: visual features
        already placed at their token positions (zero elsewhere), entry i added right after layer i.
        Without a cache, attention is over this call's own tokens and mask is [b, t, t]; with one
        (`qvl_jax.modeling.kv_cache.KVCache`), mask is [b, t, s] over what the cache returns.

        remat (no cache: training): each layer's activations are recomputed in the backward pass
        instead of kept, so activation memory holds one layer's rather than every layer's."""
        cfg = self.config
        cos, sin = mrope_cos_sin(positions, cfg)
        n_ds = 0 if deepstack is None else deepstack.shape[0]
        # A decode step has no scores to fuse.
        impl = attention.implementation(cfg.attention, x.dtype) if x.shape[1] > 1 else "einsum"
        # An unrolled loop over separate per-layer arrays: slicing a layer out of stacked weights
        # (what lax.scan does) made XLA copy the slice before every matmul, which tripled the weight
        # traffic of a CPU decode step (docs/performance.md).
        for i, layer in enumerate(self.layers):
            if remat and cache is None:
                # jax.checkpoint over the layer's state as a pure function (nnx.remat tried to write
                # Variables back across trace levels once LoRA Params were in the layer).
                graphdef, state = nnx.split(layer)
                x = jax.checkpoint(lambda st, *a: nnx.merge(graphdef, st)(*a, impl)[0])(state, x, cos, sin, mask)
            else:
                x, cache = layer(x, cos, sin, mask, impl, cache, i)
            if i < n_ds:
                x = x + deepstack[i].astype(x.dtype)
        return self.norm(x), cache
