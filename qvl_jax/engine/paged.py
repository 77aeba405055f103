"""The paged KV cache on the device: per-layer pools of fixed-size blocks, read through block tables.

Each layer's keys (and values) live in one array [num_blocks * block_size, kv_heads, head_dim]; a
token's slot is block * block_size + offset, its block taken from the request's row of the block
table. `PagedView` is what the decoder's `cache` argument takes (`TextModel.__call__` calls
`write_and_read(layer, k, v)` per layer): it scatters this call's keys and values to their slots and
gathers each row's attention window through its block table.

The gather is the "xla" kernel, plain jnp indexing that runs on every backend. `KERNEL` is the one
switch for a future Pallas paged / ragged attention kernel; only "xla" exists so far.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from qvl_jax.config import TextConfig
from qvl_jax.errors import ConfigError
from qvl_jax.sharding import logical_to_spec

ENV = "QVL_JAX_PAGED_ATTENTION"
KERNELS = ("xla",)


def kernel() -> str:
    value = os.environ.get(ENV, "xla").strip().lower() or "xla"
    if value not in KERNELS:
        raise ConfigError(f"{ENV}={value!r}: expected one of {', '.join(KERNELS)}")
    return value


class Pages(NamedTuple):
    k: tuple[jax.Array, ...]  # per layer [num_blocks * block_size, kv_heads, head_dim]
    v: tuple[jax.Array, ...]


def allocate(cfg: TextConfig, num_blocks: int, block_size: int, dtype, mesh=None) -> Pages:
    """Zeroed pools; under a mesh split over kv heads on "model" (where that divides), as the static
    cache is, and created in that sharding."""
    shape = (num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim)
    where = None
    if mesh is not None:
        where = NamedSharding(mesh, logical_to_spec(("cache_len", "kv_heads", "head_dim"), shape, mesh))
    n = cfg.num_hidden_layers
    return Pages(tuple(jnp.zeros(shape, dtype, device=where) for _ in range(n)),
                 tuple(jnp.zeros(shape, dtype, device=where) for _ in range(n)))


def block_bytes(cfg: TextConfig, block_size: int, dtype) -> int:
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


def slots(table: jax.Array, index: jax.Array, block_size: int) -> jax.Array:
    """Flat slots of token indices index [b, t] of each row, through table [b, blocks]."""
    block = jnp.take_along_axis(table, index // block_size, axis=1)
    return block * block_size + index % block_size


class PagedView:
    """One jitted call's view of the pages: where this call's tokens go (write [b, t] flat slots)
    and which slots each row's attention reads (read [b, s]). Not a pytree: it lives inside one
    trace, and `TextModel` hands back the updated view after its last layer."""

    def __init__(self, pages: Pages, write: jax.Array, read: jax.Array):
        self.pages, self.write, self.read = pages, write, read
        self._impl = kernel()

    def write_and_read(self, layer: int, k: jax.Array, v: jax.Array):
        b, t, kv, hd = k.shape
        flat = self.write.reshape(-1)
        kp = self.pages.k[layer].at[flat].set(k.reshape(b * t, kv, hd).astype(self.pages.k[layer].dtype))
        vp = self.pages.v[layer].at[flat].set(v.reshape(b * t, kv, hd).astype(self.pages.v[layer].dtype))
        ks = list(self.pages.k)
        vs = list(self.pages.v)
        ks[layer], vs[layer] = kp, vp
        view = PagedView(Pages(tuple(ks), tuple(vs)), self.write, self.read)
        # "xla": gather each row's window; keys [b, s, kv_heads, head_dim] as attention reads them.
        return kp[self.read], vp[self.read], view
