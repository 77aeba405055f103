"""The engine's scheduler: host-only bookkeeping that decides, each visit of the engine thread, which
requests prefill how many prompt tokens, which decode, and which give up their memory. It returns
plain plans (`PrefillChunk` lists, `DecodeBatch`) that the engine runs with the jitted steps, so every
decision here is tested without a device (tests/test_scheduler.py).

A visit has two phases, each planned right before it runs:
1. `schedule_prefill`: a token budget (max_num_batched_tokens) is spent on prompt chunks, first for
   the requests already prefilling (in admission order), then for waiting requests admitted into
   free slots, whose cached prefix blocks are taken instead of recomputed.
   The chunks run (packed into one step, or one step each: the engine's choice) with one decode
   token of every decoding request that `schedule_decode_one` grants a block without preempting
   anyone (the chunks planned in this visit keep theirs).
2. `schedule_decode`, once no prompt is left to prefill (`prefill_pending`): every decoding request
   is granted room for up to decode_steps more tokens.

Memory: blocks come from `BlockManager`. A request that needs a block when none is left preempts
the most recently admitted running requests (their blocks freed, their full blocks kept in the
prefix cache); a preempted request waits at the head of the queue and is recomputed later. The
request admitted first can always finish (the pool holds at least one max_model_len sequence), so
nothing deadlocks. A chunk is planned and run in the same order, and preemption only takes requests
admitted later than the one that needs the block, so no planned chunk is ever preempted.

A request here is anything with the fields `EngineRequest` has (num_computed, blocks, slot,
decoding, seq_len, max_new, outputs, cached_tokens, preemptions, admitted, features, block_hashes).
"""

from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np

from qvl_jax.engine.prefix_cache import TRASH_BLOCK, BlockManager

MIN_WINDOW = 64  # smallest attention window (tokens) a step reads, as generate's MIN_READ


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    """Prefill tokens [start, start + n) of request's sequence; final: they end its known sequence
    (its next token is chosen from the chunk's last position)."""

    request: object
    start: int
    n: int

    @property
    def end(self) -> int:
        return self.start + self.n

    @property
    def final(self) -> bool:
        return self.end == self.request.seq_len


@dataclasses.dataclass(frozen=True)
class DecodeBatch:
    """Decode the requests (in running order); request i may grow to limits[i] tokens this visit."""

    requests: list
    limits: list[int]


class Scheduler:
    """Slots, the block pool and table, and the waiting and running queues of one engine."""

    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int, max_blocks_per_seq: int,
                 max_num_batched_tokens: int, decode_steps: int, prefix_caching: bool = True,
                 stats: collections.Counter | None = None):
        self.block_size, self.max_num_seqs = block_size, max_num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_num_batched_tokens, self.decode_steps = max_num_batched_tokens, decode_steps
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.table = np.zeros((max_num_seqs, max_blocks_per_seq), np.int32)  # block table of each slot
        self.free_slots = list(range(max_num_seqs))
        self.waiting: collections.deque = collections.deque()
        self.running: list = []  # admission order (preemption victims from the end)
        self.stats = collections.Counter() if stats is None else stats  # counts preemptions, cached_tokens

    # -- requests coming and going ------------------------------------------------------------------
    def add(self, req) -> None:
        self.waiting.append(req)

    def remove(self, req) -> None:
        """Takes req out (finished, failed or cancelled), freeing its slot and blocks."""
        self._free(req)
        if req in self.waiting:
            self.waiting.remove(req)

    @property
    def requests(self) -> list:
        return list(self.running) + list(self.waiting)

    # -- plans --------------------------------------------------------------------------------------
    def schedule_prefill(self) -> list[PrefillChunk]:
        """The prompt chunks of this visit, within the token budget, in the order they must run.
        Their tokens count as computed from here on (the engine runs the chunks right away)."""
        chunks = []
        budget = self.max_num_batched_tokens
        for req in list(self.running):
            if budget <= 0:
                break
            if req.decoding or req not in self.running:  # decoding, or preempted by an earlier grant
                continue
            n = self._grant(req, min(req.seq_len - req.num_computed, budget), may_preempt=True)
            if n:
                chunks.append(self._take(req, n))
                budget -= n
        while budget > 0 and self.waiting and self.free_slots:
            req = self.waiting[0]
            n = self._admit(req, budget)
            if not n:
                break
            chunks.append(self._take(req, n))
            budget -= n
        return chunks

    def schedule_decode(self) -> DecodeBatch | None:
        """The decoding requests of this visit and how far each may grow (blocks for up to
        decode_steps more tokens, preempting later requests when the pool is dry); None if none."""
        k = self.decode_steps
        for req in [r for r in self.running if r.decoding]:
            if req in self.running:
                # The token to feed sits at seq_len - 1; room for up to k of them.
                self._grant(req, min(k, req.max_new - len(req.outputs)), may_preempt=True)
        dec = [r for r in self.running if r.decoding]
        if not dec:
            return None
        return DecodeBatch(dec, [min(len(r.blocks) * self.block_size, r.num_computed + k) for r in dec])

    def schedule_decode_one(self) -> DecodeBatch | None:
        """The decoding requests that can take one more token now without preempting anyone (a mixed
        step's decode rows: planned between the chunks of a visit, whose blocks must stay), each
        with its limit; None if none."""
        dec = []
        for req in [r for r in self.running if r.decoding]:
            if self._grant(req, min(1, req.max_new - len(req.outputs)), may_preempt=False):
                dec.append(req)
        if not dec:
            return None
        return DecodeBatch(dec, [min(len(r.blocks) * self.block_size, r.num_computed + 1) for r in dec])

    def grant(self, req, want: int) -> int:
        """Blocks for up to `want` more tokens of a decoding request, from blocks free now (never
        preempting): how far it may grow (a speculative decode phase's limit, which may take more
        tokens per visit than decode_steps)."""
        self._grant(req, want, may_preempt=False)
        return min(len(req.blocks) * self.block_size, req.num_computed + want)

    def prefill_pending(self) -> bool:
        """Whether a running request still has prompt to prefill, or a waiting one a free slot."""
        return any(not r.decoding for r in self.running) or bool(self.waiting and self.free_slots)

    def advance(self, req, n: int) -> None:
        """n more tokens of req were computed by a decode step; its full blocks join the prefix cache."""
        req.num_computed += n
        self._register_full_blocks(req)

    def window_blocks(self, n_tokens: int) -> int:
        """Blocks an attention window reads: a power-of-two bucket (at most the longest sequence's)."""
        n = max(-(-n_tokens // self.block_size), -(-MIN_WINDOW // self.block_size))
        return min(self.max_blocks_per_seq, 1 << (n - 1).bit_length())

    def window_sizes(self) -> tuple[int, ...]:
        """Every window (in tokens) `window_blocks` gives, ascending: the branches of the steps'
        window switch (`paged.PagedCache`), whose table covers the last."""
        out, n = [], 1
        while True:
            w = self.window_blocks(n * self.block_size)
            if not out or w * self.block_size != out[-1]:
                out.append(w * self.block_size)
            if w == self.max_blocks_per_seq:
                return tuple(out)
            n = w + 1

    def window_bucket(self, n_tokens: int) -> int:
        """The index in `window_sizes` of the window that n_tokens need."""
        return self.window_sizes().index(self.window_blocks(n_tokens) * self.block_size)

    # -- bookkeeping --------------------------------------------------------------------------------
    def _take(self, req, n: int) -> PrefillChunk:
        chunk = PrefillChunk(req, req.num_computed, n)
        req.num_computed += n
        self._register_full_blocks(req)
        return chunk

    def _admit(self, req, budget: int) -> int:
        """Gives req a slot and its cached prefix blocks; the tokens it may prefill now (0: it stays
        waiting, holding nothing)."""
        bs = self.block_size
        n_hashable = (req.seq_len - 1) // bs  # the last known token is always computed
        hit = self.blocks.match(req.block_hashes(n_hashable, bs))
        slot = self.free_slots.pop(0)
        req.slot, req.blocks, req.num_computed = slot, list(hit), len(hit) * bs
        self.table[slot] = TRASH_BLOCK
        self.table[slot, :len(hit)] = hit
        self.running.append(req)
        n = self._grant(req, min(req.seq_len - req.num_computed, budget), may_preempt=False)
        if n == 0:
            self._free(req)
            req.num_computed = 0
            return 0
        self.waiting.popleft()
        if req.cached_tokens is None:
            req.cached_tokens = req.num_computed
            req.admitted = time.perf_counter()
        self.stats["cached_tokens"] += req.num_computed
        return n

    def _grant(self, req, want: int, may_preempt: bool) -> int:
        """Blocks for up to `want` more tokens of req: how many tokens it may compute now (0: none).
        With may_preempt, requests admitted after req give up their blocks when the pool is dry."""
        bs = self.block_size
        target = req.num_computed + want
        while True:
            need = -(-target // bs) - len(req.blocks)
            if need <= 0:
                return want
            got = self.blocks.allocate(min(need, self.blocks.num_free))
            if got:
                self.table[req.slot, len(req.blocks):len(req.blocks) + len(got)] = got
                req.blocks += got
            if len(got or []) == need:
                return want
            if may_preempt:
                later = self.running[self.running.index(req) + 1:]
                if later:
                    self._preempt(later[-1])
                    continue
            return max(0, len(req.blocks) * bs - req.num_computed)

    def _register_full_blocks(self, req) -> None:
        n_full = min(req.num_computed // self.block_size, len(req.blocks))
        for i, h in enumerate(req.block_hashes(n_full, self.block_size)):
            self.blocks.register(req.blocks[i], h)

    def _free(self, req) -> None:
        if req.blocks:
            self._register_full_blocks(req)
            self.blocks.release(req.blocks)
        req.blocks = []
        req.features = None
        if req.slot >= 0:
            self.table[req.slot] = TRASH_BLOCK
            self.free_slots.append(req.slot)
            req.slot = -1
        if req in self.running:
            self.running.remove(req)

    def _preempt(self, req) -> None:
        """Frees req's memory; it waits at the head of the queue and is recomputed later."""
        self._free(req)
        req.num_computed = 0
        req.decoding = False
        req.preemptions += 1
        self.stats["preemptions"] += 1
        self.waiting.appendleft(req)
