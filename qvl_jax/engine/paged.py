"""The paged KV cache on the device: per-layer pools of fixed-size blocks, read through block tables.

Each layer's keys (and values) live in one array [num_blocks * block_size, kv_heads, head_dim]; a
token's slot is block * block_size + offset, its block taken from the request's row of the block
table. `PagedView` is what the decoder's `cache` argument takes (`TextModel.__call__` calls
`write_and_read(layer, k, v)` per layer): it scatters this call's keys and values to their slots and
gathers each row's attention window through its block table.

The kernel is chosen by one switch, the environment variable QVL_JAX_PAGED_ATTENTION:

- "xla" (default): the gather above, plain jnp indexing, then the decoder's own attention. A decode
  loop gathers its rows' windows once, into buffers the engine keeps, and writes each step's token
  into them as well as into the pages (`window_buffers`, `PagedView`; up to the engine's
  window_copy_bytes, else it gathers every step). Runs on every backend; every engine test runs it.
- "pallas": decode steps run JAX's Pallas paged attention kernel
  (`jax.experimental.pallas.ops.gpu.paged_attention`, Triton on a GPU, interpret mode elsewhere),
  which reads each row's blocks in place instead of gathering a window first. The pools are then laid
  out as that kernel takes them, [kv_heads, num_blocks, block_size, head_dim]; prefill chunks (more
  than one query) gather from that layout and run the decoder's attention. One device only. Tested
  equal to "xla" in interpret mode on the CPU; whether it is faster on a GPU is not measured yet.
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
KERNELS = ("xla", "pallas")


def kernel() -> str:
    value = os.environ.get(ENV, "xla").strip().lower() or "xla"
    if value not in KERNELS:
        raise ConfigError(f"{ENV}={value!r}: expected one of {', '.join(KERNELS)}")
    return value


class Pages(NamedTuple):
    k: tuple[jax.Array, ...]  # per layer [num_blocks * block_size, kv_heads, head_dim] ("pallas":
    v: tuple[jax.Array, ...]  # [kv_heads, num_blocks, block_size, head_dim])


def allocate(cfg: TextConfig, num_blocks: int, block_size: int, dtype, mesh=None) -> Pages:
    """Zeroed pools in the layout the configured kernel reads; under a mesh split over kv heads on
    "model" (where that divides), as the static cache is, and created in that sharding."""
    shape = (num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim)
    where = None
    if kernel() == "pallas":
        if mesh is not None:
            raise ConfigError(f"{ENV}=pallas runs on one device; unset it to serve a sharded model")
        shape = (cfg.num_key_value_heads, num_blocks, block_size, cfg.head_dim)
    elif mesh is not None:
        where = NamedSharding(mesh, logical_to_spec(("cache_len", "kv_heads", "head_dim"), shape, mesh))
    n = cfg.num_hidden_layers
    return Pages(tuple(jnp.zeros(shape, dtype, device=where) for _ in range(n)),
                 tuple(jnp.zeros(shape, dtype, device=where) for _ in range(n)))


def block_bytes(cfg: TextConfig, block_size: int, dtype) -> int:
    """Bytes of every layer's keys and values for block_size tokens (a block; or, with rows x window
    tokens, a decode loop's `window_buffers`)."""
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


def window_buffers(cfg: TextConfig, rows: int, window: int, dtype, mesh=None) -> tuple:
    """Zeroed buffers for `gather_windows`: (keys, values), each a tuple of [rows, window, kv_heads,
    head_dim] per layer; under a mesh split over kv heads as the pools are."""
    shape = (rows, window, cfg.num_key_value_heads, cfg.head_dim)
    where = None
    if mesh is not None:
        where = NamedSharding(mesh, logical_to_spec((None, "cache_len", "kv_heads", "head_dim"), shape, mesh))
    n = cfg.num_hidden_layers
    return (tuple(jnp.zeros(shape, dtype, device=where) for _ in range(n)),
            tuple(jnp.zeros(shape, dtype, device=where) for _ in range(n)))


def gather_windows(pages: Pages, read: jax.Array, into: tuple) -> tuple:
    """Every layer's keys and values at slots read [b, s] ("xla" layout), written into the buffers
    `into` (of `window_buffers`): (keys, values), each a tuple of [b, s, kv_heads, head_dim] per layer."""
    return tuple(tuple(jax.lax.dynamic_update_slice(buf, p[read], (0, 0, 0, 0)) for buf, p in zip(bufs, pool))
                 for bufs, pool in zip(into, (pages.k, pages.v)))


def slots(table: jax.Array, index: jax.Array, block_size: int) -> jax.Array:
    """Flat slots of token indices index [b, t] of each row, through table [b, blocks]."""
    block = jnp.take_along_axis(table, index // block_size, axis=1)
    return block * block_size + index % block_size


class PagedView:
    """One jitted call's view of the pages: where this call's tokens go (write [b, t] flat slots)
    and which slots each row's attention reads (read [b, s]). Not a pytree: it lives inside one
    trace, and `TextModel` hands back the updated view after its last layer.

    table [b, blocks] and lengths [b] (tokens each row attends to, this call's included) are what the
    "pallas" kernel reads instead of `read`; a decode step passes them.

    windows (the "xla" kernel, one query per row; () where none): each layer's windows (keys, values: per layer
    [b, s, kv_heads, head_dim]) gathered once before a loop of decode steps (`gather_windows`), and
    at [b] the window index this step's token goes to (s: nowhere, an inactive row). The step then
    writes its token into the pages and into the windows, and attention reads the windows: the
    same keys and values as gathering them every step, without the gather (on the CPU, 8 rows over
    2048 tokens at 2B widths, 4 layers: 149 -> 113 ms a step; 1 row: 92 -> 60 ms)."""

    def __init__(self, pages: Pages, write: jax.Array, read: jax.Array, table: jax.Array | None = None,
                 lengths: jax.Array | None = None, windows: tuple = (), at: jax.Array | None = None):
        self.pages, self.write, self.read = pages, write, read
        self.table, self.lengths = table, lengths
        self.windows, self.at = windows, at
        self._impl = kernel()

    def _store(self, layer: int, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, "PagedView"]:
        b, t, kv, hd = k.shape
        flat = self.write.reshape(-1)
        kp, vp = self.pages.k[layer], self.pages.v[layer]
        k, v = k.reshape(b * t, kv, hd).astype(kp.dtype), v.reshape(b * t, kv, hd).astype(vp.dtype)
        if self._impl == "pallas":
            bs = kp.shape[2]
            blk, off = flat // bs, flat % bs
            kp = kp.at[:, blk, off].set(k.transpose(1, 0, 2))
            vp = vp.at[:, blk, off].set(v.transpose(1, 0, 2))
        else:
            kp, vp = kp.at[flat].set(k), vp.at[flat].set(v)
        ks, vs = list(self.pages.k), list(self.pages.v)
        ks[layer], vs[layer] = kp, vp
        return kp, vp, PagedView(Pages(tuple(ks), tuple(vs)), self.write, self.read, self.table, self.lengths,
                                 self.windows, self.at)

    def write_and_read(self, layer: int, k: jax.Array, v: jax.Array):
        """Stores this call's keys and values; returns each row's window [b, s, kv_heads, head_dim]."""
        kp, vp, view = self._store(layer, k, v)
        if self.windows:
            rows = jnp.arange(k.shape[0])
            wk, wv = (list(w) for w in self.windows)
            wk[layer] = wk[layer].at[rows, self.at].set(k[:, 0].astype(wk[layer].dtype), mode="drop")
            wv[layer] = wv[layer].at[rows, self.at].set(v[:, 0].astype(wv[layer].dtype), mode="drop")
            view.windows = (tuple(wk), tuple(wv))
            return wk[layer], wv[layer], view
        if self._impl == "pallas":
            bs = kp.shape[2]
            blk, off = self.read // bs, self.read % bs
            return kp[:, blk, off].transpose(1, 2, 0, 3), vp[:, blk, off].transpose(1, 2, 0, 3), view
        return kp[self.read], vp[self.read], view

    def fused_attention(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array):
        """(attention output [b, 1, heads, head_dim], the updated view) from the "pallas" kernel for a
        decode step given table and lengths; None where the decoder attends itself."""
        if self._impl != "pallas" or q.shape[1] != 1 or self.table is None:
            return None
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

        kp, vp, view = self._store(layer, k, v)
        b, _, n, hd = q.shape
        pages = self.table.shape[1]
        splits = min(16, pages & -pages)  # a power of two dividing the window's block count
        per = pages // splits
        compute = max(d for d in range(1, min(8, per) + 1) if per % d == 0)
        q = (q[:, 0].astype(jnp.float32) * hd ** -0.5).astype(kp.dtype)  # the kernel does not scale
        o = paged_attention(q, kp, vp, self.table, self.lengths.astype(jnp.int32), k_splits=splits,
                            pages_per_compute_block=compute, interpret=jax.default_backend() != "gpu")
        return o[:, None].astype(k.dtype), view

