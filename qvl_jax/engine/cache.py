"""The preallocated static KV cache: a pytree threaded through prefill and decode, and `StaticView`,
the `qvl_jax.modeling.kv_cache.KVCache` through which the decoder writes and reads it.

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
from qvl_jax.modeling.kv_cache import KVCache
from qvl_jax.sharding import check_mesh, logical_to_spec

# KV cache fields -> logical axes (qvl_jax.sharding.RULES maps them to mesh axes).
CACHE_AXES = dict(
    k=("layers", "batch", "cache_len", "kv_heads", "head_dim"),
    v=("layers", "batch", "cache_len", "kv_heads", "head_dim"),
)


class StaticCache(NamedTuple):
    """The cache of a static batch: every row's keys and values at their sequence indices. Rows are
    left-padded, so they all write at the same index (`StaticView`); where each row's real tokens
    start, where the batch ends and the rotary offsets are the host's to keep (`qvl_jax.engine.steps.Rows`)."""

    k: jax.Array  # [layers, b, max_len, kv_heads, head_dim]
    v: jax.Array

    cpu = False  # not a field: the steps look tokens up through the model (`paged.PagedCache.cpu`)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def view(self, index: jax.Array, valid: jax.Array, window: int) -> "StaticView":
        """The decoder's view for tokens at cache indices index [b, t] (the same for every active row
        of a static batch; a finished row lags behind and is written over at the batch's index)."""
        return StaticView(self.k, self.v, jnp.max(index[:, 0]), window)

    def merge(self, view: "StaticView") -> "StaticCache":
        return StaticCache(view.k, view.v)

    def start_decode(self, rows: int, window: int) -> "StaticCache":
        return self

    def end_decode(self) -> "StaticCache":
        return self


def allocate(cfg: TextConfig, batch: int, max_len: int, dtype, mesh=None) -> StaticCache:
    """A zeroed cache; under a mesh each field is created directly in its sharding
    (`cache_sharding`), never whole on one device."""
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    if mesh is None:
        where = StaticCache(None, None)
    else:
        where = cache_sharding(cfg, mesh, batch)
    return StaticCache(jnp.zeros(shape, dtype, device=where.k), jnp.zeros(shape, dtype, device=where.v))


def grow(cache: StaticCache, max_len: int) -> StaticCache:
    """The same cache with room for max_len entries (one copy; used when a chat outgrows its cache)."""
    pad = [(0, 0)] * 5
    pad[2] = (0, max_len - cache.max_len)
    return cache._replace(k=jnp.pad(cache.k, pad), v=jnp.pad(cache.v, pad))


def cache_bytes(cfg: TextConfig, batch: int, max_len: int, dtype) -> int:
    return 2 * cfg.num_hidden_layers * batch * max_len * cfg.num_key_value_heads * cfg.head_dim * \
        jnp.dtype(dtype).itemsize


def cache_sharding(config: Qwen3VLConfig | TextConfig, mesh, batch: int) -> StaticCache:
    """A StaticCache whose fields are the NamedShardings of a cache of `batch` rows: k, v split over
    kv heads on "model" and over rows on "data" (each where it divides)."""
    mesh = check_mesh(mesh)
    cfg = getattr(config, "text", config)
    kv_shape = (cfg.num_hidden_layers, batch, 1, cfg.num_key_value_heads, cfg.head_dim)  # length never split
    shapes = dict(k=kv_shape, v=kv_shape)
    return StaticCache(**{f: NamedSharding(mesh, logical_to_spec(CACHE_AXES[f], shapes[f], mesh))
                          for f in StaticCache._fields})


class StaticView(KVCache):
    """One jitted call's view of a static cache's k, v [layers, b, max_len, kv_heads, head_dim]: this
    call's tokens go to indices [write_pos, write_pos + t) of every row (write_pos traced, shared by
    the batch), and attention reads the first `read_len` (static) entries, the filled part."""

    def __init__(self, k: jax.Array, v: jax.Array, write_pos: jax.Array, read_len: int):
        self.k, self.v, self.write_pos, self.read_len = k, v, write_pos, read_len

    def update(self, layer: int, k: jax.Array, v: jax.Array):
        at = (layer, 0, self.write_pos, 0, 0)
        ck = jax.lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), at)
        cv = jax.lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), at)
        return (ck[layer, :, :self.read_len], cv[layer, :, :self.read_len],
                StaticView(ck, cv, self.write_pos, self.read_len))
