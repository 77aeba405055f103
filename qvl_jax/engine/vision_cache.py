"""The engine's vision-encoder cache: merged and DeepStack features of each image or video, keyed by
its content digest (grid and pixel bytes), bounded in bytes, least recently used out first. Held
on the host (numpy): the engine gathers each prefill chunk's rows from them there.

An image already encoded is not encoded again while its features are cached: the same picture
with a new question, or the next turn of a chat whose prefix blocks were evicted.
"""

from __future__ import annotations

import collections

import numpy as np


class VisionCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._items: collections.OrderedDict[str, tuple[np.ndarray, np.ndarray, int]] = collections.OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, digest: str) -> tuple[np.ndarray, np.ndarray] | None:
        item = self._items.get(digest)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(digest)
        self.hits += 1
        return item[0], item[1]

    def put(self, digest: str, feats: np.ndarray, deepstack: np.ndarray) -> None:
        size = feats.nbytes + deepstack.nbytes
        if size > self.max_bytes or digest in self._items:
            return
        while self.bytes + size > self.max_bytes:
            _, (_, _, s) = self._items.popitem(last=False)
            self.bytes -= s
        self._items[digest] = (feats, deepstack, size)
        self.bytes += size
