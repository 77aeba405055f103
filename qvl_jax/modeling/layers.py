"""Layers both towers share: Linear, Embedding, RMSNorm, LayerNorm as Flax NNX modules, and the
rotary helpers.

Params carry Hugging Face's names and shapes (`weight` [out, in] for a Linear, `bias` [out], norm
`weight`, embedding `weight` [rows, width]), so a module's flattened state path is its checkpoint
key. Each Param also carries `axes`: the logical axis name of each dim, which qvl_jax.sharding maps
to mesh axes. A logical axis may name a group of `units` consecutive entries (an attention head of
head_dim rows in a flattened [heads * head_dim, in] weight) so that a split never cuts a head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx


def param(rngs: nnx.Rngs | None, shape, axes, dtype, init: str = "normal", units=None) -> nnx.Param:
    """A Param of `shape` with logical `axes` (and optional per-dim `units`). init: "normal" (std
    1/sqrt(fan_in)), "zeros" or "ones". rngs=None (an abstract build under nnx.eval_shape) is fine
    for the constant inits."""
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        value = (jax.random.normal(rngs.params(), shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype)
    return nnx.Param(value, axes=tuple(axes), units=tuple(units or (1,) * len(shape)))


# Up to this many rows, on the CPU, `matmul_t` multiplies with the weight on the left. Measured on the
# 2-core AVX-512 CI machine by scripts/bench_matmul.py (a 4-layer decoder at 2B widths and its tied
# lm_head, ms per step, 2026-12-02; docs/performance.md):
#   rows          1     2     4     8    16    32    64   128   256   512
#   x @ w.T      63   127   122   121   159   207   288   330   368   691
#   (w @ x.T).T  59    68    69    66    84   132   214   294   363   697
WEIGHT_LEFT_MAX_ROWS = 128


def matmul_t(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] times w [out, in] transposed: [..., out].

    XLA CPU hands such a dot to YNNPACK, which runs a row-major [out, in] weight on the LEFT of the
    dot at about the speed of reading it, and on the right about half as fast from 2 rows up (the
    table above). From 2 to WEIGHT_LEFT_MAX_ROWS rows it is therefore computed as (w @ x.T).T: a
    batch-8 decode step at 2B widths costs about what a batch-1 step does, not twice that. The
    optimization barrier keeps XLA from folding the transpose back into the dot (which restores the
    slow form); the transpose itself is of the small [out, rows] result. Other backends, and other row counts,
    take the plain dot.

    w may be a `qwix.QArray` (weight-only quantization, `qvl_jax.modeling.quant`): qwix's dot_general
    then dequantizes it (int8/int4 values times their scales, in the scales' dtype) into the dot."""
    rows = int(np.prod(x.shape[:-1]))
    if jax.default_backend() == "cpu" and x.dtype == w.dtype == jnp.bfloat16 and not isinstance(w, qwix.QArray):
        return _matmul_t_bf16(x, w, rows)
    if 1 < rows <= WEIGHT_LEFT_MAX_ROWS and jax.default_backend() == "cpu":
        y = _dot(w)(w, x.reshape(rows, x.shape[-1]), (((1,), (1,)), ((), ())))
        return jax.lax.optimization_barrier(y).T.reshape(*x.shape[:-1], w.shape[0])
    return _dot(w)(x, w, (((x.ndim - 1,), (1,)), ((), ())))


def _matmul_t_bf16(x: jax.Array, w: jax.Array, rows: int) -> jax.Array:
    """`matmul_t` of bfloat16 operands on the CPU: the products accumulate into a float32 result,
    rounded to bfloat16 once (as torch's bfloat16 matmul), and one row is computed as two. XLA:CPU
    runs that as its native AVX512_BF16 product; a bfloat16 result, or a single row, takes a generic
    path 4-12x slower (the tied lm_head at one row: 450-610 ms against 37-49; at 8 rows 612 against
    46-52; `scripts/bench_matmul.py --dtype bfloat16`, docs/performance.md)."""
    x2 = x.reshape(rows, x.shape[-1])
    if rows == 1:
        x2 = jnp.concatenate([x2, x2])
    dims = (((1,), (1,)), ((), ()))
    if x2.shape[0] <= WEIGHT_LEFT_MAX_ROWS:
        y = jax.lax.optimization_barrier(jax.lax.dot_general(w, x2, dims, preferred_element_type=jnp.float32)).T
        y = _round_row_major(y[:rows])
    else:
        y = round_to(jax.lax.dot_general(x2, w, dims, preferred_element_type=jnp.float32)[:rows], jnp.bfloat16)
    return y.reshape(*x.shape[:-1], w.shape[0])


@jax.jit
def _round_row_major(y: jax.Array) -> jax.Array:
    """y rounded to bfloat16, laid out row-major. The transpose before it is a layout change to XLA
    (the result [rows, out] column-major), which the ops after it inherit; a bfloat16 product taking
    such an operand falls to XLA:CPU's float32 path, which converts the whole weight to float32
    every call (the vision tower's MLP down projection after the bias and GELU: 64 patches through
    18 blocks 360 ms against 71). The parameter of a jitted function is row-major, and XLA keeps
    that layout for the ops inside when it inlines the call, so the convert here makes the copy."""
    return round_to(y, jnp.bfloat16)


def round_to(y: jax.Array, dtype) -> jax.Array:
    """y cast to `dtype`, rounded there as torch rounds it (a bfloat16 product's float32 sums, an
    RMSNorm's normalised value). A bare convert to a narrower float is not enough: where the next op
    takes the value back to float32 (an RMSNorm, the rotary embedding), XLA's default excess
    precision drops the convert pair and that op sees the unrounded value; `reduce_precision` to the
    narrower type's bits rounds the value itself, which XLA keeps."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < jnp.finfo(y.dtype).bits:
        info = jnp.finfo(dtype)
        y = jax.lax.reduce_precision(y, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return y.astype(dtype)


def _dot(w):
    return qwix.dot_general if isinstance(w, qwix.QArray) else jax.lax.dot_general


def weight_value(var: nnx.Variable):
    """A weight Variable's value: a jax.Array, or a `qwix.QArray` where the weight is quantized."""
    return var.get_value()


class PackedWeight(nnx.Variable):
    """A `Linear`'s weight rearranged for a product kernel, beside its Param (the engine packs the
    decoder's for its CPU kernels: `qvl_jax.engine.packed`); not a Param: no gradient, not saved."""


class Linear(nnx.Module):
    """y = x @ weight.T (+ bias), weight [*out, *in] in Hugging Face's [out, in] layout.

    The weight is viewed as one [out, in] matrix (a free reshape) and contracted on its last axis by
    `matmul_t` (which puts it on the left of the dot where that is faster). A weight of more than two
    dims (the Conv3d patch embedding [out, C, T, P, P]) contracts its trailing dims."""

    def __init__(self, in_shape, out_features: int, *, bias: bool, axes, rngs, dtype=jnp.float32,
                 units=None):
        in_shape = tuple(in_shape) if isinstance(in_shape, (tuple, list)) else (in_shape,)
        self.weight = param(rngs, (out_features, *in_shape), axes, dtype, units=units)
        self.bias = param(rngs, (out_features,), axes[:1], dtype, "zeros", units and units[:1]) if bias else None

    def __call__(self, x: jax.Array, out_shape: tuple[int, ...] | None = None) -> jax.Array:
        """x [..., in] -> [..., out], or [..., *out_shape] (heads split out of the output). Where a
        packed copy of the weight sits beside it (`PackedWeight`, with the kernel that reads it in
        `packed_product`: the engine's, `qvl_jax.engine.packed`), the product runs there (the same
        float32 sums, rounded to the dtype)."""
        packed = getattr(self, "packed", None)
        if packed is not None:
            # The float32 sums rounded to the dtype by the kernel, as `matmul_t` rounds its dot's.
            y = self.packed_product(x, packed[...])
        else:
            w = weight_value(self.weight)
            if w.ndim > 2:
                w = w.reshape(w.shape[0], -1)
            y = matmul_t(x, w)
        if self.bias is not None:
            y = y + self.bias[...]
        return y if out_shape is None else y.reshape(*x.shape[:-1], *out_shape)


class Embedding(nnx.Module):
    """A lookup table `weight` [rows, width]."""

    def __init__(self, rows: int, width: int, *, axes, rngs, dtype=jnp.float32):
        self.weight = param(rngs, (rows, width), axes, dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)

    def attend(self, h: jax.Array) -> jax.Array:
        """h [..., width] against every row: the tied lm_head (through a packed copy of the table
        where one sits beside it, as in `Linear`)."""
        packed = getattr(self, "packed", None)
        if packed is not None:
            return self.packed_product(h, packed[...])
        return matmul_t(h, self.weight[...])


def silu(x: jax.Array) -> jax.Array:
    """SiLU as torch computes it: x / (1 + exp(-x)) in float32, rounded once to x's dtype.
    (`jax.nn.silu` on bfloat16 rounds the sigmoid to bfloat16 before the product, and XLA:CPU runs
    that form at twice the time: [512, 6144] 3.5 against 1.9 ms.)"""
    x32 = x.astype(jnp.float32)
    return (x32 / (1 + jnp.exp(-x32))).astype(x.dtype)


def gelu(x: jax.Array, approximate: bool) -> jax.Array:
    """GELU (tanh approximation or exact erf) in float32, rounded once to x's dtype, as torch's
    opmath does for bfloat16 (`jax.nn.gelu` on bfloat16 rounds every intermediate to bfloat16)."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=approximate).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # As the reference: normalise in float32, cast back to the input dtype, then apply the weight.
    # At bfloat16 XLA drops a bare cast (its default excess precision: the weight would multiply the
    # float32 value, where torch rounds it first; docs/design-notes.md), so it is rounded first.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * round_to(y, x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, axes, rngs=None, dtype=jnp.float32):
        self.weight = param(rngs, (dim,), axes, dtype, "ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = 1e-6, *, axes, rngs=None, dtype=jnp.float32):
        self.weight = param(rngs, (dim,), axes, dtype, "ones")
        self.bias = param(rngs, (dim,), axes, dtype, "zeros")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        # As torch's layer_norm: affine in float32 too, one rounding at the end.
        y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...].astype(jnp.float32)
             + self.bias[...].astype(jnp.float32))
        return y.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """1 / theta^(2i/head_dim) as the reference builds it: a float32 exponent, the power rounded to
    float32, a float32 reciprocal. (numpy's float32 power differs from torch's by up to 4 ulp, and a
    frequency error grows with the position it multiplies.)"""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / power).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., heads, h]; cos/sin [..., h] (broadcast over heads). Rotation in float32, result in
    x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[..., None, :] + rotated * sin[..., None, :]).astype(x.dtype)
