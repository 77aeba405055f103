"""The paged KV cache's block bookkeeping (host side): a free list, reference counts, and the prefix
cache, which keeps full blocks keyed by a hash chain over their token ids and the content hashes of
the images and videos whose features those tokens carry.

Block 0 is never handed out: the jitted steps send every write of a padding token or an idle slot
there, so it is the one place garbage may land.

A block's hash covers everything its keys and values depend on: the previous block's hash (so the
whole prefix), its token ids, and the digest (grid and pixels) of every image or video that overlaps
it. The same token ids behind a different picture therefore never hit (DESIGN §3.14), and neither
does any block after it. Unreferenced hashed blocks stay cached in LRU order and are evicted only
when the free list is empty.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Iterable

import numpy as np

TRASH_BLOCK = 0  # takes writes of padding tokens and idle slots; never allocated


def block_hash(prev: bytes, tokens: np.ndarray, media_digests: Iterable[str]) -> bytes:
    """The hash of one full block: chained on the previous block's hash."""
    h = hashlib.sha256(prev)
    h.update(np.ascontiguousarray(tokens, np.int64).tobytes())
    for d in media_digests:
        h.update(b"|media:" + d.encode())
    return h.digest()


class BlockManager:
    """Hands out KV blocks, counts their users and keeps the prefix cache.

    `num_free` counts every block a request could get now: the free list plus cached blocks no
    request uses (those are evicted, least recently used first, when the free list runs dry)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self._free = collections.deque(range(1, num_blocks))
        self._ref = np.zeros(num_blocks, np.int64)
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # unreferenced, hashed
        self.hits = self.queries = self.evictions = 0  # blocks

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._lru)

    @property
    def num_cached(self) -> int:
        """Blocks held by the prefix cache (referenced or not)."""
        return len(self._by_hash)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (referenced once), or None when fewer than n can be had."""
        if n > self.num_free:
            return None
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:  # evict the least recently used cached block
                b, _ = self._lru.popitem(last=False)
                del self._by_hash[self._hash_of.pop(b)]
                self.evictions += 1
            self._ref[b] = 1
            out.append(b)
        return out

    def match(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes`, each now referenced once more."""
        out = []
        if not self.prefix_caching:
            return out
        self.queries += len(hashes)
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            if self._ref[b] == 0:
                del self._lru[b]
            self._ref[b] += 1
            out.append(b)
        self.hits += len(out)
        return out

    def register(self, block: int, h: bytes) -> None:
        """Records a full block under its hash (first writer wins; a duplicate stays private)."""
        if not self.prefix_caching or h in self._by_hash or block in self._hash_of:
            return
        self._by_hash[h] = block
        self._hash_of[block] = h

    def release(self, blocks: list[int]) -> None:
        """Drops one reference to each block. The tail of a sequence goes first into the LRU order,
        so a shared prefix outlives the parts only one request had."""
        for b in reversed(blocks):
            self._ref[b] -= 1
            assert self._ref[b] >= 0, f"block {b} released twice"
            if self._ref[b] == 0:
                if b in self._hash_of:
                    self._lru[b] = None
                else:
                    self._free.append(b)
