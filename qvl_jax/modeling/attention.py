"""Attention math and the choice of kernel.

The kernel is a setting of the loaded model (`qvl_jax.load(path, attention=...)`, the CLI's
`--attention`), carried by its config (`Qwen3VLConfig.attention`), so that every jitted function
keyed on the model's structure compiles for it and host-side preparation lays the vision blocks out
as it needs. Four choices (`qvl_jax.config.ATTENTION_KERNELS`):

- "xla" (default): our own einsums + float32 softmax over an explicit mask, compiled by XLA. Every
  parity test against transformers runs it; it works on any backend and dtype.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` for the vision tower and text
  prefill, cuDNN's fused (flash) attention, which never writes the [heads, q, k] scores to memory.
  It applies only on a GPU backend with bfloat16 / float16 activations (cuDNN has no float32
  kernel); elsewhere "xla" runs instead.
- "dot_product": the same `jax.nn.dot_product_attention` call with XLA's implementation, on any
  backend. It exists so that the fused path's inputs (per-block sequence lengths, the mask as the
  kernel takes it) are tested on a CPU, where cuDNN cannot run.
- "pallas": as "xla", except that the engine's decode steps run JAX's Pallas paged attention
  kernel over the paged KV cache (`qvl_jax.engine.paged.PallasPagedView`).

Decode steps (one query token) run the einsum path except under "pallas" in the engine: there is no
score matrix to avoid. The vision tower's fused path needs one frame per attention block (padding
at the block's end, so that sequence lengths can mask it), so with "dot_product" or "cudnn" the host
lays frames out unpacked (`vision.block_layout(pack=False)`).

Whether "cudnn" is faster has not been measured yet (no GPU so far); scripts/gpu_check.sh measures
both, and the default changes only with those numbers (docs/performance.md).

Einsum letters: b batch, t query time, s key time, n query heads, k kv heads, g query heads per kv
head, h head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qvl_jax.config import ATTENTION_KERNELS  # noqa: F401  (the choices, re-exported for readers)


def implementation(kernel: str, dtype) -> str:
    """What computes a multi-query attention (vision blocks, prefill) for activations of `dtype` on
    the default backend under the model's kernel setting: "einsum" (ours), "xla" or "cudnn" (the
    `implementation` of `jax.nn.dot_product_attention`). "cudnn" becomes "einsum" where cuDNN cannot
    run (not a GPU, or not a 16-bit float)."""
    if kernel == "dot_product":
        return "xla"
    if kernel == "cudnn" and jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "einsum"


def packs_frames(kernel: str) -> bool:
    """Whether the vision block layout may put several frames in one attention block under this
    kernel setting (only the einsum path's explicit frame mask keeps them apart). Decided on the
    host, without the dtype: "cudnn" always lays frames out unpacked, which the einsum fallback
    also runs correctly."""
    return kernel not in ("dot_product", "cudnn")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str = "einsum") -> jax.Array:
    """GQA attention of q [b, t, n, h] over k, v [b, s, k, h]; mask [b, t, s] True where allowed.
    Query head n uses kv head n // groups, as transformers' repeat_kv. Softmax in float32.
    impl: "einsum" (ours) or a `jax.nn.dot_product_attention` implementation (`implementation`).
    Returns [b, t, n * h]."""
    b, t, n, h = q.shape
    if impl != "einsum":
        return fused(q, k, v, impl, mask=mask).reshape(b, t, n * h)
    kv_heads = k.shape[2]
    if t == 1 and (b >= ONE_QUERY_MIN_ROWS or k.shape[1] >= ONE_QUERY_MIN_KEYS):
        return _attend_one(q, k, v, mask)
    g = n // kv_heads
    # Each kv head's g query heads as rows of one product ([t * g, h] x [h, s], rows ordered (t, g)):
    # XLA:CPU runs that as one large matmul per kv head and masks it in one pass, where the
    # [b, k, g, t, s] layout took a matmul per query head and a masking pass 5x slower (512 queries
    # over 1024 keys at 2B widths: 93 -> 46 ms a layer; docs/performance.md).
    q = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * g, h)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    scores = jnp.einsum("bkqh,bskh->bkqs", q, k, preferred_element_type=jnp.float32) * (h ** -0.5)
    scores = jnp.where(jnp.repeat(mask, g, axis=1)[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    # A float32 result, rounded once: XLA:CPU runs a bfloat16-result product on its generic path,
    # about 10x slower than its native bfloat16 product into float32 (the same values: float32
    # accumulation rounded to bfloat16 either way).
    out = jnp.einsum("bkqs,bskh->bkqh", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
    return out.reshape(b, kv_heads, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n * h)


# From this many rows a one-query attention runs as `_attend_one`; below it the einsums are as fast or
# faster (batch 1 on the quick config: 0.31-0.37 ms a decode step with the einsums, 0.54-0.56 with
# `_attend_one` in the whole model; docs/performance.md, "What was tried").
ONE_QUERY_MIN_ROWS = 8
# ... and at any row count from this many keys: the einsums' keys and values are first copied into the
# dot's layout (a transposing copy of the whole window each step), which grows with the window. At 2B
# widths, 4 layers, a 1558-token prompt: 1 row 90.5 -> 72.0 ms a decode step, 4 rows over a 679-token
# prompt 132 -> 101 ms; at a 49-token prompt (64 keys) the einsums stay (docs/performance.md).
ONE_QUERY_MIN_KEYS = 512


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


def fused(q: jax.Array, k: jax.Array, v: jax.Array, impl: str, *, mask: jax.Array | None = None,
          lengths: jax.Array | None = None) -> jax.Array:
    """`jax.nn.dot_product_attention` over q [B, T, N, H], k, v [B, S, K, H] (N a multiple of K).

    mask [B, T, S] (True where allowed), or lengths [B]: the first lengths[b] queries and keys of
    block b are real, the rest padding. Scores and softmax in float32 (both implementations), output
    in q's dtype."""
    if lengths is not None:
        lengths = jnp.maximum(lengths, 1).astype(jnp.int32)  # an all-padding block attends to one slot, not none
    return jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), mask=None if mask is None else mask[:, None],
        query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation=impl)
