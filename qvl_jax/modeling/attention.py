"""Which attention kernel the vision blocks and text prefill run.

Three choices, named by the environment variable QVL_JAX_ATTENTION (read once, on first use):

- "einsum" (default): our own einsum + float32 softmax over an explicit mask. Every parity test
  against transformers runs it; it works on any backend and dtype.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused (flash) attention,
  which never writes the [heads, q, k] scores to memory. It applies only on a GPU backend with
  bfloat16 / float16 activations (cuDNN has no float32 kernel); elsewhere "einsum" runs instead.
- "xla": the same `jax.nn.dot_product_attention` call with XLA's implementation, on any backend. It
  exists so that the fused path's inputs (per-block sequence lengths, the mask as the kernel takes
  it) are tested on a CPU, where cuDNN cannot run.

Decode steps (one query token) always run the einsum path: there is no score matrix to avoid.
The vision tower's fused path needs one frame per attention block (padding at the block's end, so
that sequence lengths can mask it), so with "xla" or "cudnn" the host lays frames out unpacked
(`vision.block_layout(pack=False)`).

Whether "cudnn" is faster has not been measured yet (no GPU so far); scripts/gpu_check.sh measures
both, and the default changes only with those numbers (docs/performance.md).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from qvl_jax.errors import ConfigError

ENV = "QVL_JAX_ATTENTION"
CHOICES = ("einsum", "xla", "cudnn")


def _configured() -> str:
    value = os.environ.get(ENV, "einsum").strip().lower() or "einsum"
    if value not in CHOICES:
        raise ConfigError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(CHOICES)}")
    return value


IMPL: str | None = None  # the setting, read from the environment on first use (tests set it directly)


def configured() -> str:
    """The configured choice. Read on first use rather than at import, so that a bad value is a
    ConfigError inside the request that meets it (one line from the CLI), not an import failure."""
    global IMPL
    if IMPL is None:
        IMPL = _configured()
    return IMPL


def kernel(dtype) -> str:
    """The kernel that runs for activations of `dtype` on the default backend: the configured one,
    except that "cudnn" becomes "einsum" where cuDNN cannot run (not a GPU, or not a 16-bit float)."""
    impl = configured()
    if impl == "cudnn" and (jax.default_backend() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16)):
        return "einsum"
    return impl


def packs_frames() -> bool:
    """Whether the vision block layout may put several frames in one attention block (only the
    einsum path's explicit frame mask keeps them apart)."""
    return configured() == "einsum"


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
