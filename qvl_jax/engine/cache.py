"""The preallocated static KV cache: a pytree threaded through prefill and decode.

k, v [layers, batch, max_len, kv_heads, head_dim] hold every fed token's keys and values. A row's
real tokens occupy [start, end): prompts are left-padded, so rows start at different places and all
end at the same `end`, the next write index. `delta` is each row's rope_delta: a token at cache index
i has rotary position (i - start) + delta on all three axes once the prompt is past.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from qvl_jax.config import Qwen3VLConfig, TextConfig
from qvl_jax.sharding import check_mesh, logical_to_spec

# KV cache fields -> logical axes (qvl_jax.sharding.RULES maps them to mesh axes).
CACHE_AXES = dict(
    k=("layers", "batch", "cache_len", "kv_heads", "head_dim"),
    v=("layers", "batch", "cache_len", "kv_heads", "head_dim"),
    start=("batch",),
    end=(),
    delta=("batch",),
)


class KVCache(NamedTuple):
    k: jax.Array  # [layers, b, max_len, kv_heads, head_dim]
    v: jax.Array
    start: jax.Array  # [b] int32: first real index of each row
    end: jax.Array  # [] int32: next write index (shared by the batch)
    delta: jax.Array  # [b] int32: rope_delta of each row

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def allocate(cfg: TextConfig, batch: int, max_len: int, dtype, mesh=None) -> KVCache:
    """A zeroed cache; under a mesh each field is created directly in its sharding
    (`cache_sharding`), never whole on one device."""
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    if mesh is None:
        where = KVCache(None, None, None, None, None)
    else:
        where = cache_sharding(cfg, mesh, batch)
    return KVCache(jnp.zeros(shape, dtype, device=where.k), jnp.zeros(shape, dtype, device=where.v),
                   jnp.zeros((batch,), jnp.int32, device=where.start), jnp.zeros((), jnp.int32, device=where.end),
                   jnp.zeros((batch,), jnp.int32, device=where.delta))


def grow(cache: KVCache, max_len: int) -> KVCache:
    """The same cache with room for max_len entries (one copy; used when a chat outgrows its cache)."""
    pad = [(0, 0)] * 5
    pad[2] = (0, max_len - cache.max_len)
    return cache._replace(k=jnp.pad(cache.k, pad), v=jnp.pad(cache.v, pad))


def cache_bytes(cfg: TextConfig, batch: int, max_len: int, dtype) -> int:
    return 2 * cfg.num_hidden_layers * batch * max_len * cfg.num_key_value_heads * cfg.head_dim * \
        jnp.dtype(dtype).itemsize


def cache_sharding(config: Qwen3VLConfig | TextConfig, mesh, batch: int) -> KVCache:
    """A KVCache whose fields are the NamedShardings of a cache of `batch` rows: k, v split over
    kv heads on "model" and over rows on "data" (each where it divides), positions over rows."""
    mesh = check_mesh(mesh)
    cfg = getattr(config, "text", config)
    kv_shape = (cfg.num_hidden_layers, batch, 1, cfg.num_key_value_heads, cfg.head_dim)  # length never split
    shapes = dict(k=kv_shape, v=kv_shape, start=(batch,), end=(), delta=(batch,))
    return KVCache(**{f: NamedSharding(mesh, logical_to_spec(CACHE_AXES[f], shapes[f], mesh))
                      for f in KVCache._fields})
