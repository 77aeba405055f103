"""The Qwen3-VL text decoder as pure functions of an explicit param pytree.

RMSNorm, grouped-query attention with per-head QK-norm, interleaved multimodal RoPE (3-D positions),
SwiGLU MLP, DeepStack injection after the first layers. `params["layers"]` is a list of per-layer
param dicts, run as an unrolled loop.

Einsum letters: b batch, t query time, s key time, d model width, n query heads, k kv heads,
g query heads per kv head, h head_dim, f MLP width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qvl_jax.modeling import attention
from qvl_jax.config import TextConfig


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    # As the reference: normalise in float32, cast back to the input dtype, then apply the weight.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * y.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """1 / theta^(2i/head_dim) as the reference builds it: a float32 exponent, the power rounded to
    float32, a float32 reciprocal. (numpy's float32 power differs from torch's by up to 4 ulp, and a
    frequency error grows with the position it multiplies.)"""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / power).astype(np.float32)


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


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [b, t, heads, h]; cos/sin [b, t, h]. Rotation in float32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def linear(x: jax.Array, p: dict, out_ndim: int = 1) -> jax.Array:
    """x [..., in] through p["weight"] [*out, *in] (Hugging Face's [out, in] layout, with the first
    `out_ndim` axes the output: heads may be split out of either side), plus p["bias"] [*out] if present.

    The weight is viewed as one [out, in] matrix (a free reshape) and contracted on its last axis.
    XLA CPU runs that 1.2-1.8x faster than x @ [in, out] at decode and short-prefill row counts, and
    contracting a split axis pair in one einsum ran a generic dot at a tenth of the speed."""
    w = p["weight"]
    out_shape = w.shape[:out_ndim]
    w = w.reshape(int(np.prod(out_shape)), -1)
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))
    y = y.reshape(*x.shape[:-1], *out_shape)
    return y + p["bias"] if "bias" in p else y


def qkv(p: dict, x: jax.Array, cos: jax.Array, sin: jax.Array, cfg: TextConfig):
    """Queries [b, t, n, h] and keys/values [b, t, k, h]: projections, per-head QK-norm, then MRoPE."""
    eps = cfg.rms_norm_eps
    q = rms_norm(linear(x, p["q_proj"], 2), p["q_norm"]["scale"], eps)
    k = rms_norm(linear(x, p["k_proj"], 2), p["k_norm"]["scale"], eps)
    v = linear(x, p["v_proj"], 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attend(p: dict, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str = "einsum") -> jax.Array:
    """GQA attention of q [b, t, n, h] over k, v [b, s, k, h]; mask [b, t, s] True where allowed.

    Query head n uses kv head n // groups, as transformers' repeat_kv. Softmax in float32. impl: the
    kernel (see qvl_jax.modeling.attention); "einsum" is the one written out here."""
    b, t, n, h = q.shape
    if impl != "einsum":
        return linear(attention.fused(q, k, v, impl, mask=mask).reshape(b, t, n * h), p["o_proj"])
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * (h ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n * h)
    return linear(out, p["o_proj"])  # weight [d, heads, head_dim]


def mlp(p: dict, x: jax.Array) -> jax.Array:
    gate = linear(x, p["gate_proj"])
    up = linear(x, p["up_proj"])
    return linear(jax.nn.silu(gate) * up, p["down_proj"])


def decoder(params: dict, cfg: TextConfig, x: jax.Array, positions: jax.Array, mask: jax.Array,
            deepstack: jax.Array | None = None, cache: tuple[jax.Array, jax.Array] | None = None,
            write_pos: jax.Array | None = None, read_len: int | None = None):
    """All decoder layers and the final norm: (hidden [b, t, d], updated cache or None).

    x [b, t, d] input embeddings; positions [3, b, t]; deepstack [n, b, t, d]: visual features already
    placed at their token positions (zero elsewhere), entry i added right after layer i.

    Without a cache, attention is over this call's own tokens and mask is [b, t, t]. With a cache
    (k, v [layers, b, max_len, kv_heads, head_dim]) this call's keys and values are written at
    `write_pos` (shared by the batch) and attention reads the first `read_len` (static) cache entries:
    mask is [b, t, read_len]. params["layers"] is a list of per-layer dicts (see model.unstack_layers).
    """
    cos, sin = mrope_cos_sin(positions, cfg)
    n_ds = 0 if deepstack is None else deepstack.shape[0]
    impl = attention.kernel(x.dtype) if x.shape[1] > 1 else "einsum"  # a decode step has no scores to fuse
    # Layers run as an unrolled loop over separate per-layer arrays: slicing a layer out of stacked
    # weights (what lax.scan does) makes XLA copy the slice before every matmul, which tripled the
    # weight traffic of a CPU decode step (docs/performance.md).
    for i, p in enumerate(params["layers"]):
        q, k, v = qkv(p["self_attn"], rms_norm(x, p["input_layernorm"]["scale"], cfg.rms_norm_eps), cos, sin, cfg)
        if cache is not None:
            ck, cv = cache
            at = (i, 0, write_pos, 0, 0)
            ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), at)
            cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), at)
            k = ck[i, :, :read_len]
            v = cv[i, :, :read_len]
            cache = (ck, cv)
        x = x + attend(p["self_attn"], q, k, v, mask, impl)
        x = x + mlp(p["mlp"], rms_norm(x, p["post_attention_layernorm"]["scale"], cfg.rms_norm_eps))
        if i < n_ds:
            x = x + deepstack[i].astype(x.dtype)
    return rms_norm(x, params["norm"]["scale"], cfg.rms_norm_eps), cache
