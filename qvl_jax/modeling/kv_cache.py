"""The KV cache protocol: what a decoder layer's attention reads and writes.

`TextModel.__call__` takes `cache=None` (attention over the call's own tokens: training, logits) or
a `KVCache`. Per layer, `DecoderLayer` hands the cache this call's queries, keys and values;
`attend` stores the keys and values where this call's tokens go and returns the attention output
with the updated cache. Three implementations live in the engine: the static preallocated cache
(`qvl_jax.engine.cache.StaticView`), the paged cache read through block tables
(`qvl_jax.engine.paged.PagedView`) and the same pages read in place by JAX's Pallas kernel
(`PallasPagedView`). A cache object lives inside one trace (it is not a pytree): the decoder hands
back the updated one after its last layer, and the caller takes its arrays out.
"""

from __future__ import annotations

import jax

from qvl_jax.modeling import attention


class KVCache:
    """Base of the cache views. A view implements `update`; a view with its own attention kernel
    also overrides `attend`."""

    def update(self, layer: int, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, "KVCache"]:
        """Stores keys and values k, v [b, t, kv_heads, head_dim] of this call's tokens in `layer`;
        returns (keys, values) [b, s, kv_heads, head_dim] that attention reads (the mask given to
        the decoder is [b, t, s]) and the updated cache."""
        raise NotImplementedError

    def attend(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
               impl: str) -> tuple[jax.Array, "KVCache"]:
        """(attention output [b, t, heads * head_dim], updated cache): stores k, v, then attends
        with q [b, t, heads, head_dim] over what `update` returns, through `attention.attend`
        (impl: "einsum" or a fused implementation)."""
        keys, values, cache = self.update(layer, k, v)
        return attention.attend(q, keys, values, mask, impl), cache
