"""The paged KV cache on the device: per-layer pools of fixed-size blocks, read through block tables.

Each layer's keys (and values) live in one array [num_blocks * block_size, kv_heads, head_dim]; a
token's slot is block * block_size + offset, its block taken from the request's row of the block
table. `PagedView` is what the decoder's `cache` argument takes (`TextModel.__call__` calls
`write_and_read(layer, k, v)` per layer): it scatters this call's keys and values to their slots and
gathers each row's attention window through its block table.

Two views implement `qvl_jax.modeling.kv_cache.KVCache` over the pools, chosen by the model's
attention kernel (`qvl_jax.load(path, attention=...)`, or the engine's own `attention=`):

- `PagedView` (every kernel but "pallas"): the gather above, plain jnp indexing, then the decoder's
  own attention. A decode loop gathers its rows' windows once, into buffers the engine keeps, and
  writes each step's token into them as well as into the pages (`window_buffers`; up to the
  engine's window_copy_bytes, else it gathers every step). Runs on every backend. On the CPU the
  engine skips the gather: the C++ kernels of `qvl_jax.engine.cpu_kernel` read the keys and values
  in the pools, for decode rows (one query a row) and for prefill chunks (several), each query up
  to its last allowed key (`PagedCache.cpu`); the engine tests run both.
- `PallasPagedView` ("pallas"): decode steps run JAX's Pallas paged attention kernel
  (`jax.experimental.pallas.ops.gpu.paged_attention`, Triton on a GPU, interpret mode elsewhere),
  which reads each row's blocks in place instead of gathering a window first. The pools are then
  laid out as that kernel takes them, [kv_heads, num_blocks, block_size, head_dim]; prefill chunks
  (more than one query) gather from that layout and run the decoder's attention. One device only.
  Tested equal to `PagedView` in interpret mode on the CPU; whether it is faster on a GPU is not
  measured yet.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from qvl_jax.config import TextConfig
from qvl_jax.engine import cpu_kernel
from qvl_jax.engine.prefix_cache import TRASH_BLOCK
from qvl_jax.errors import ConfigError
from qvl_jax.modeling import attention
from qvl_jax.modeling.kv_cache import KVCache
from qvl_jax.sharding import logical_to_spec


class Pages(NamedTuple):
    k: tuple[jax.Array, ...]  # per layer [num_blocks * block_size, kv_heads, head_dim] ("pallas":
    v: tuple[jax.Array, ...]  # [kv_heads, num_blocks, block_size, head_dim])


def allocate(cfg: TextConfig, num_blocks: int, block_size: int, dtype, mesh=None, pallas: bool = False) -> Pages:
    """Zeroed pools in the layout the view reads (pallas: `PallasPagedView`'s); under a mesh split
    over kv heads on "model" (where that divides), as the static cache is, and created in that
    sharding."""
    shape = (num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim)
    where = None
    if pallas:
        if mesh is not None:
            raise ConfigError("attention='pallas' runs on one device; use attention='xla' to serve a sharded model")
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
    """Zeroed buffers for `PagedCache.start_decode` to gather decode windows into: (keys, values), each a tuple of [rows, window, kv_heads,
    head_dim] per layer; under a mesh split over kv heads as the pools are."""
    shape = (rows, window, cfg.num_key_value_heads, cfg.head_dim)
    where = None
    if mesh is not None:
        where = NamedSharding(mesh, logical_to_spec((None, "cache_len", "kv_heads", "head_dim"), shape, mesh))
    n = cfg.num_hidden_layers
    return (tuple(jnp.zeros(shape, dtype, device=where) for _ in range(n)),
            tuple(jnp.zeros(shape, dtype, device=where) for _ in range(n)))


def slots(table: jax.Array, index: jax.Array, block_size: int) -> jax.Array:
    """Flat slots of token indices index [b, t] of each row, through table [b, blocks]."""
    block = jnp.take_along_axis(table, index // block_size, axis=1)
    return block * block_size + index % block_size


@functools.partial(jax.tree_util.register_dataclass, data_fields=["pages", "table", "windows", "bucket"],
                   meta_fields=["block_size", "pallas", "sizes", "cpu"])
@dataclasses.dataclass
class PagedCache:
    """The paged cache as one jitted step takes it (`qvl_jax.engine.steps`): the pools, the block
    table of the step's rows [r, blocks] (attention reads blocks * block_size cache indices), and
    for a decode loop the window buffers (`window_buffers`, or () to gather every step).

    Window buckets (sizes, bucket): the table then covers the engine's longest window, and
    attention reads only the first sizes[bucket] cache indices of each row, bucket a traced
    scalar: one compiled step serves every window (`lax.switch` over the sizes, each branch the
    same attention over its window as a step compiled for that window alone). The window buffers
    may be shorter than the table (sizes up to their length read them, longer ones the pages).

    cpu: the CPU kernels (`qvl_jax.engine.cpu_kernel`) write this call's keys and values into the
    pools in place, and attention reads the allowed keys where they lie: one query per row (decode
    steps, a mixed step's decode rows) through the decode kernel, several (a prefill chunk, a
    speculative verify) through the prefill kernel: no window buffers, no bucket."""

    pages: Pages
    table: jax.Array
    windows: tuple = ()
    bucket: jax.Array | None = None
    block_size: int = 16
    pallas: bool = False
    sizes: tuple = ()
    cpu: bool = False

    def view(self, index: jax.Array, valid: jax.Array, window: int) -> "PagedView":
        """The decoder's view for tokens at cache indices index [r, t] (valid [r, t]: real tokens;
        the rest are written to the trash block). One query per row (a decode step) also tells the
        view each row's length and, with window buffers, where the token goes in them."""
        bs = self.block_size
        assert window == self.table.shape[1] * bs, (window, self.table.shape, bs)
        r = index.shape[0]
        write = jnp.where(valid, slots(self.table, jnp.minimum(index, window - 1), bs), TRASH_BLOCK)
        read = slots(self.table, jnp.broadcast_to(jnp.arange(window), (r, window)), bs)
        cls = PallasPagedView if self.pallas else PagedView
        buckets = (self.bucket, self.sizes) if self.sizes else None
        cpu_block = self.block_size if self.cpu else 0
        if index.shape[1] != 1:
            return cls(self.pages, write, read, self.table if self.cpu else None, buckets=buckets, cpu_block=cpu_block)
        at = jnp.where(valid[:, 0], index[:, 0], window)
        return cls(self.pages, write, read, self.table, index[:, 0] + 1, self.windows, at, buckets, cpu_block)

    def packed_view(self, index: jax.Array, row: jax.Array, valid: jax.Array, starts: jax.Array) -> "PagedView":
        """The CPU kernels' view of the prompt chunks of several rows packed into one sequence (a
        mixed step's): token i [1, t] is row[0, i]'s (of the table's rows) at cache index
        index[0, i] (valid: real tokens; the rest go to the trash block); row r's tokens are
        [starts[r], starts[r + 1]) (`cpu_kernel.paged_prefill_packed`)."""
        assert self.cpu, "a packed chunk runs through the CPU kernels"
        bs = self.block_size
        block = self.table[row, jnp.minimum(index // bs, self.table.shape[1] - 1)]
        write = jnp.where(valid, block * bs + index % bs, TRASH_BLOCK)
        return PagedView(self.pages, write, None, self.table, cpu_block=bs, starts=starts)

    def merge(self, view: "PagedView") -> "PagedCache":
        return dataclasses.replace(self, pages=view.pages, windows=view.windows if self.windows else ())

    def start_decode(self, rows: int, window: int) -> "PagedCache":
        """Gathers each row's window into the buffers once, before a decode loop (with window
        buckets: the first sizes[bucket] indices, where they fit the buffers).

        A loop of in-place block copies, as many as the window needs: a `lax.switch` over one
        gather per window size made XLA copy every buffer whole first (a conditional's branches
        do not update their operands in place), about 1 GB a loop for 8 rows at 2B widths."""
        if not self.windows:
            return self
        bs = self.block_size
        held = self.windows[0][0].shape[1]
        fits = [w for w in (self.sizes or (window,)) if w <= held]
        if not fits:
            return self
        c = functools.reduce(math.gcd, fits + [256])  # tokens a step: divides every window that fits
        if self.sizes:
            n = jnp.asarray(self.sizes, jnp.int32)[self.bucket]
            n = jnp.where(n <= held, n, 0)  # longer windows are read from the pages every step
        else:
            n = window

        def copy(i, windows):
            read = slots(self.table, jnp.broadcast_to(i * c + jnp.arange(c), (rows, c)), bs)
            return tuple(tuple(jax.lax.dynamic_update_slice(buf, p[read], (0, i * c, 0, 0)) for buf, p in zip(bufs, pool))
                         for bufs, pool in zip(windows, (self.pages.k, self.pages.v)))

        return dataclasses.replace(self, windows=jax.lax.fori_loop(0, n // c, copy, self.windows))

    def end_decode(self) -> "PagedCache":
        return self


class PagedView(KVCache):
    """One jitted call's view of the pages: where this call's tokens go (write [b, t] flat slots)
    and which slots each row's attention reads (read [b, s]). Lives inside one trace; `TextModel`
    hands back the updated view after its last layer.

    table [b, blocks] and lengths [b] (tokens each row attends to, this call's included) are what
    `PallasPagedView` reads instead of `read`; a decode step passes them.

    windows (one query per row; () where none): each layer's windows (keys, values: per layer
    [b, s, kv_heads, head_dim]) gathered once before a loop of decode steps (`PagedCache.start_decode`), and
    at [b] the window index this step's token goes to (s: nowhere, an inactive row). The step then
    writes its token into the pages and into the windows, and attention reads the windows: the
    same keys and values as gathering them every step, without the gather (on the CPU, 8 rows over
    2048 tokens at 2B widths, 4 layers: 149 -> 113 ms a step; 1 row: 92 -> 60 ms).

    cpu_block (> 0: the block size; `PagedCache.cpu`): the keys and values are written with
    `cpu_kernel.put_rows`, and attention runs in the CPU kernels over the pages through table
    (`cpu_kernel.paged_decode` for one query per row, `cpu_kernel.paged_prefill` for more); windows
    and buckets are then not read."""

    def __init__(self, pages: Pages, write: jax.Array, read: jax.Array | None, table: jax.Array | None = None,
                 lengths: jax.Array | None = None, windows: tuple = (), at: jax.Array | None = None,
                 buckets: tuple | None = None, cpu_block: int = 0, starts: jax.Array | None = None):
        self.pages, self.write, self.read = pages, write, read
        self.table, self.lengths = table, lengths
        self.windows, self.at = windows, at
        self.buckets = buckets  # (bucket, sizes): attention reads the first sizes[bucket] indices
        self.cpu_block = cpu_block
        self.starts = starts  # [rows + 1]: a packed chunk's rows' spans (`PagedCache.packed_view`)

    def _replace(self, **kw) -> "PagedView":
        fields = dict(pages=self.pages, write=self.write, read=self.read, table=self.table, lengths=self.lengths,
                      windows=self.windows, at=self.at, buckets=self.buckets, cpu_block=self.cpu_block,
                      starts=self.starts)
        return type(self)(**{**fields, **kw})

    def _scatter(self, kp: jax.Array, vp: jax.Array, flat: jax.Array, k: jax.Array, v: jax.Array):
        """Writes k, v [n, kv_heads, head_dim] at flat slots [n] of one layer's pools (on the CPU in
        place through the kernel: XLA:CPU's own bfloat16 scatter converts the whole pools to float32
        and back, 18 ms a pool at 2B widths, 8 rows of 2048 tokens)."""
        if self.cpu_block:
            return cpu_kernel.put_rows(kp, flat, k), cpu_kernel.put_rows(vp, flat, v)
        return kp.at[flat].set(k), vp.at[flat].set(v)

    def _gather(self, kp: jax.Array, vp: jax.Array):
        """Each row's window [b, s, kv_heads, head_dim] of one layer's pools."""
        return kp[self.read], vp[self.read]

    def _store(self, layer: int, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, "PagedView"]:
        b, t, kv, hd = k.shape
        kp, vp = self.pages.k[layer], self.pages.v[layer]
        kp, vp = self._scatter(kp, vp, self.write.reshape(-1), k.reshape(b * t, kv, hd).astype(kp.dtype),
                               v.reshape(b * t, kv, hd).astype(vp.dtype))
        ks, vs = list(self.pages.k), list(self.pages.v)
        ks[layer], vs[layer] = kp, vp
        return kp, vp, self._replace(pages=Pages(tuple(ks), tuple(vs)))

    def _store_windows(self, layer: int, k: jax.Array, v: jax.Array, view: "PagedView"):
        """Writes a decode step's token into this layer's window buffers; returns them."""
        rows = jnp.arange(k.shape[0])
        wk, wv = (list(w) for w in self.windows)
        wk[layer] = wk[layer].at[rows, self.at].set(k[:, 0].astype(wk[layer].dtype), mode="drop")
        wv[layer] = wv[layer].at[rows, self.at].set(v[:, 0].astype(wv[layer].dtype), mode="drop")
        view.windows = (tuple(wk), tuple(wv))
        return wk[layer], wv[layer]

    def update(self, layer: int, k: jax.Array, v: jax.Array):
        """Stores this call's keys and values; returns each row's window [b, s, kv_heads, head_dim]."""
        kp, vp, view = self._store(layer, k, v)
        if self.windows:
            return (*self._store_windows(layer, k, v, view), view)
        return (*self._gather(kp, vp), view)

    def attend(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str):
        """As `KVCache.attend`; with window buckets, over the first sizes[bucket] cache indices only
        (one `lax.switch` branch per size: the window buffers where the size fits them, else a gather
        of that many indices from the pages)."""
        if self.buckets is None and not self.cpu_block:
            return super().attend(layer, q, k, v, mask, impl)
        kp, vp, view = self._store(layer, k, v)
        wk, wv = self._store_windows(layer, k, v, view) if self.windows else (None, None)
        return self._attend_stored(q, mask, impl, kp, vp, wk, wv), view

    def _attend_stored(self, q: jax.Array, mask: jax.Array, impl: str, kp: jax.Array, vp: jax.Array,
                       wk: jax.Array | None = None, wv: jax.Array | None = None) -> jax.Array:
        """Attention of q over the pools kp, vp of one layer that already hold this call's keys and
        values (and over the window buffers wk, wv where the bucket fits them)."""
        if self.cpu_block and q.shape[1] == 1:
            r, _, n, h = q.shape
            out = cpu_kernel.paged_decode(q[:, 0], kp, vp, self.table, mask[:, 0], self.cpu_block)
            return out.reshape(r, 1, n * h)
        if self.cpu_block and self.starts is not None:
            r, t, n, h = q.shape
            out = cpu_kernel.paged_prefill_packed(q, kp, vp, self.table, mask, self.starts, self.cpu_block)
            return out.reshape(r, t, n * h)
        if self.cpu_block:
            r, t, n, h = q.shape
            return cpu_kernel.paged_prefill(q, kp, vp, self.table, mask, self.cpu_block).reshape(r, t, n * h)
        if self.buckets is None:
            keys, values = self._gather(kp, vp)
            return attention.attend(q, keys, values, mask, impl)
        bucket, sizes = self.buckets
        held = 0 if wk is None else wk.shape[1]

        def branch(w: int):
            def run(q, mask, kp, vp, wk, wv):
                if w <= held:
                    keys, values = wk[:, :w], wv[:, :w]
                else:
                    keys, values = self._replace(read=self.read[:, :w])._gather(kp, vp)
                return attention.attend(q, keys, values, mask[:, :, :w], impl)
            return run

        return jax.lax.switch(bucket, [branch(w) for w in sizes], q, mask, kp, vp, wk, wv)


class PallasPagedView(PagedView):
    """`PagedView` over pools in the Pallas kernel's layout [kv_heads, num_blocks, block_size,
    head_dim] (`allocate(pallas=True)`); a decode step given table and lengths attends through JAX's
    Pallas paged attention kernel, which reads each row's blocks in place."""

    def _scatter(self, kp, vp, flat, k, v):
        bs = kp.shape[2]
        blk, off = flat // bs, flat % bs
        return kp.at[:, blk, off].set(k.transpose(1, 0, 2)), vp.at[:, blk, off].set(v.transpose(1, 0, 2))

    def _gather(self, kp, vp):
        bs = kp.shape[2]
        blk, off = self.read // bs, self.read % bs
        return kp[:, blk, off].transpose(1, 2, 0, 3), vp[:, blk, off].transpose(1, 2, 0, 3)

    def attend(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str):
        if q.shape[1] != 1 or self.table is None:  # a prefill chunk: gather, then the decoder's attention
            return super().attend(layer, q, k, v, mask, impl)
        # Imported only when this kernel is chosen: it loads Pallas' GPU lowering.
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
        return o.astype(k.dtype).reshape(b, 1, n * hd), view


class MixedView(KVCache):
    """The view of a mixed step (`steps.mixed`): one sequence of t + s tokens whose first t are
    prefill chunks (`first`: a `PagedView` of one row's chunk, or through the CPU kernels the packed
    chunks of several rows, `PagedCache.packed_view`) and whose last s are one decode token of each
    of s rows (`second`, a `PagedView` of those rows). Per layer, one scatter stores both parts' keys
    and values, then each part attends over its own rows' windows of the updated pools (a row's
    window holds only its own blocks, so each reads what it would have read alone).

    One scatter, not one per part: with the first part's attention reading the pools between two
    scatters into them, XLA could not update them in place and copied every layer's pools twice a
    step (at 2B widths, 8 slots, the default pool: ~4 GB of copies, most of a mixed step's time)."""

    def __init__(self, first: PagedView, second: PagedView, t: int):
        self.first, self.second, self.t = first, second, t

    @property
    def pages(self) -> Pages:
        return self.second.pages

    @property
    def windows(self) -> tuple:
        return ()

    def attend(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, mask: tuple, impl: str):
        t, s = self.t, q.shape[1] - self.t
        mask_first, mask_second = mask
        both = self.first._replace(write=jnp.concatenate([self.first.write.reshape(-1), self.second.write.reshape(-1)]))
        kp, vp, stored = both._store(layer, k, v)  # k, v [1, t + s, ...]: the chunk's, then the rows'
        out_first = self.first._attend_stored(q[:, :t], mask_first, impl, kp, vp)
        # One query per row ([1, s, ...] -> [s, 1, ...]): the decode step's attention, as `steps.decode` runs it.
        out_second = self.second._attend_stored(jnp.swapaxes(q[:, t:], 0, 1), mask_second, "einsum", kp, vp)
        out = jnp.concatenate([out_first, out_second.reshape(1, s, -1)], axis=1)
        return out, MixedView(self.first._replace(pages=stored.pages), self.second._replace(pages=stored.pages), t)
