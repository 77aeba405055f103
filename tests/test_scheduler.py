"""The engine's scheduler on its own: plans of prefill chunks and decode batches, block grants,
prefix-cache hits and preemption, with plain fake requests (no model, no device, no JAX call).

Block size 4 throughout; block 0 is the trash block, so a pool of n blocks hands out n - 1."""

from __future__ import annotations

import numpy as np

from qvl_jax.engine.prefix_cache import TRASH_BLOCK, block_hash
from qvl_jax.engine.scheduler import DecodeBatch, Scheduler

BS = 4


class FakeRequest:
    """What the scheduler reads and writes of an engine request."""

    def __init__(self, prompt, max_new=8, digests=None):
        self.prompt = list(prompt)
        self.outputs: list[int] = []
        self.max_new = max_new
        self.digests = digests or {}  # block index -> media digests behind it
        self.num_computed, self.blocks, self.slot = 0, [], -1
        self.decoding, self.cached_tokens, self.preemptions = False, None, 0
        self.admitted = self.features = None

    @property
    def seq_len(self) -> int:
        return len(self.prompt) + len(self.outputs)

    def block_hashes(self, n_blocks: int, bs: int) -> list[bytes]:
        seq = self.prompt + self.outputs
        out, prev = [], b""
        for i in range(n_blocks):
            prev = block_hash(prev, np.asarray(seq[i * bs:(i + 1) * bs]), self.digests.get(i, []))
            out.append(prev)
        return out


def sched(num_blocks=64, max_num_seqs=4, max_blocks_per_seq=8, budget=16, decode_steps=4, prefix=True):
    return Scheduler(num_blocks, BS, max_num_seqs, max_blocks_per_seq, budget, decode_steps, prefix)


def plan(s: Scheduler):
    return [(c.request, c.start, c.n, c.final) for c in s.schedule_prefill()]


def finish_prefill(reqs, token=7):
    """What the engine does after a final chunk: the first token, and the request decodes."""
    for r in reqs:
        r.outputs.append(token)
        r.decoding = True


def test_budget_is_spent_in_admission_order_and_chunks_continue():
    s = sched(budget=16)
    a, b, c = FakeRequest(range(10)), FakeRequest(range(100, 109)), FakeRequest(range(200, 205))
    for r in (a, b, c):
        s.add(r)
    assert plan(s) == [(a, 0, 10, True), (b, 0, 6, False)]
    assert [r.slot for r in (a, b, c)] == [0, 1, -1] and list(s.waiting) == [c]
    assert a.num_computed == 10 and b.num_computed == 6
    assert len(a.blocks) == 3 and len(b.blocks) == 2  # ceil(10 / 4), ceil(6 / 4)
    assert list(s.table[0, :3]) == a.blocks and TRASH_BLOCK not in a.blocks + b.blocks
    finish_prefill([a])
    # b goes on first (already running), then c is admitted with what is left of the budget.
    assert plan(s) == [(b, 6, 3, True), (c, 0, 5, True)]
    assert s.schedule_prefill() == []  # nothing left to prefill: a decodes, b and c wait for their first token


def test_decode_batch_grants_room_for_decode_steps():
    s = sched(budget=64, decode_steps=4)
    a, b = FakeRequest(range(6), max_new=3), FakeRequest(range(50, 58), max_new=10)
    s.add(a)
    s.add(b)
    plan(s)
    finish_prefill([a, b])
    batch = s.schedule_decode()
    assert isinstance(batch, DecodeBatch) and batch.requests == [a, b]
    # a: 6 computed, 2 more tokens allowed (max_new 3, one out) -> blocks for 8; b: 8 + 4 -> 12.
    assert batch.limits == [8, 12]
    assert len(a.blocks) == 2 and len(b.blocks) == 3
    s.advance(b, 4)
    assert b.num_computed == 12
    assert s.schedule_decode().limits == [8, 16]


def test_prefix_cache_hit_skips_shared_blocks_but_never_the_last_token():
    s = sched(budget=64)
    shared = list(range(300, 308))  # two full blocks
    a = FakeRequest(shared + [1, 2, 3])
    s.add(a)
    plan(s)
    b = FakeRequest(shared + [9, 9])
    s.add(b)
    assert plan(s) == [(b, 8, 2, True)]
    assert b.cached_tokens == 8 and b.blocks[:2] == a.blocks[:2] and s.stats["cached_tokens"] == 8
    # A prompt that is exactly the cached blocks recomputes its last block: its last token's logits
    # choose the first new token.
    c = FakeRequest(shared)
    s.add(c)
    assert plan(s) == [(c, 4, 4, True)]
    assert c.cached_tokens == 4


def test_same_tokens_behind_another_picture_do_not_hit():
    s = sched(budget=64)
    tokens = list(range(400, 412))
    a = FakeRequest(tokens, digests={1: ["picture-1"]})
    s.add(a)
    plan(s)
    b = FakeRequest(tokens, digests={1: ["picture-2"]})
    s.add(b)
    assert plan(s) == [(b, 4, 8, True)]  # block 0 is shared; block 1 (and all after) is not
    assert b.blocks[0] == a.blocks[0] and b.blocks[1] != a.blocks[1]


def test_without_prefix_caching_nothing_is_shared():
    s = sched(budget=64, prefix=False)
    a, b = FakeRequest(range(12)), FakeRequest(range(12))
    s.add(a)
    plan(s)
    s.add(b)
    assert plan(s) == [(b, 0, 12, True)] and b.cached_tokens == 0


def test_decode_preempts_the_latest_admitted_request():
    # 6 usable blocks. a and b take 3 each (12 tokens); a's decode needs a 4th: b gives up its blocks.
    s = sched(num_blocks=7, budget=64, decode_steps=4)
    a, b = FakeRequest(range(12), max_new=8), FakeRequest(range(100, 112), max_new=8)
    s.add(a)
    s.add(b)
    assert [(r, n) for r, _, n, _ in plan(s)] == [(a, 12), (b, 12)]
    finish_prefill([a, b])
    assert s.blocks.num_free == 0
    batch = s.schedule_decode()
    assert batch.requests == [a] and batch.limits == [16] and len(a.blocks) == 4
    assert b.preemptions == 1 and b.num_computed == 0 and not b.decoding and b.blocks == [] and b.slot == -1
    assert list(s.waiting) == [b] and s.stats["preemptions"] == 1
    assert (s.table[1] == TRASH_BLOCK).all()
    # b's full blocks went to the prefix cache; a's new block evicted the last of them. b needs 4
    # blocks for its 13 tokens, 2 of them cached, and none is free: it waits, holding nothing.
    assert plan(s) == [] and b.blocks == [] and list(s.waiting) == [b]
    s.remove(a)
    # Then it comes back from its two cached blocks: its prompt and the token it had made survive.
    assert plan(s) == [(b, 8, 5, True)]
    assert b.seq_len == 13 and b.cached_tokens == 0  # cached_tokens counts the first admission only


def test_a_request_with_no_later_one_waits_for_blocks_instead():
    # a and b hold 3 blocks each and 1 is free: a takes it; b, the last admitted, preempts nobody
    # and stays in the batch without room (limit = what it has computed), until blocks come back.
    s = sched(num_blocks=8, budget=64, decode_steps=4)
    a, b = FakeRequest(range(12)), FakeRequest(range(100, 112))
    s.add(a)
    s.add(b)
    plan(s)
    finish_prefill([a, b])
    batch = s.schedule_decode()
    assert batch.requests == [a, b] and batch.limits == [16, 12]
    assert a.preemptions == b.preemptions == 0


def test_admission_never_preempts_and_waits_holding_nothing():
    s = sched(num_blocks=6, budget=64, max_num_seqs=4)  # 5 usable blocks
    a = FakeRequest(range(20))  # 5 blocks
    s.add(a)
    plan(s)
    b = FakeRequest(range(100, 104))
    s.add(b)
    assert plan(s) == []
    assert list(s.waiting) == [b] and b.slot == -1 and b.blocks == [] and a.preemptions == 0
    assert sorted(s.free_slots) == [1, 2, 3]
    s.remove(a)  # a finished: its blocks and slot come back
    assert plan(s) == [(b, 0, 4, True)]


def test_slots_bound_the_running_requests():
    s = sched(max_num_seqs=2, budget=64)
    reqs = [FakeRequest(range(i * 10, i * 10 + 4)) for i in range(3)]
    for r in reqs:
        s.add(r)
    assert [r for r, *_ in plan(s)] == reqs[:2]
    assert list(s.waiting) == [reqs[2]]
    s.remove(reqs[0])
    assert [r for r, *_ in plan(s)] == [reqs[2]] and reqs[2].slot == 0


def test_remove_frees_everything_and_keeps_full_blocks_cached():
    s = sched(budget=64)
    a = FakeRequest(range(10))
    s.add(a)
    plan(s)
    total = s.blocks.num_free
    s.remove(a)
    assert a.slot == -1 and a.blocks == [] and s.running == [] and s.blocks.num_free == total + 3
    assert s.blocks.num_cached == 2  # the two full blocks stay in the prefix cache
    waiting = FakeRequest(range(3))
    s.add(waiting)
    s.remove(waiting)
    assert list(s.waiting) == []


def test_window_blocks_are_power_of_two_buckets():
    s = sched(max_blocks_per_seq=64)
    assert [s.window_blocks(n) for n in (1, 64, 65, 128, 129, 200)] == [16, 16, 32, 32, 64, 64]
    assert sched(max_blocks_per_seq=20).window_blocks(79) == 20  # never past a sequence's blocks
    s = sched(max_blocks_per_seq=100)  # 400 tokens
    assert s.window_sizes() == (64, 128, 256, 400)
    assert [s.window_bucket(n) for n in (1, 64, 65, 200, 257, 400)] == [0, 0, 1, 2, 3, 3]
    assert sched(max_blocks_per_seq=20).window_sizes() == (64, 80)


def test_decode_rides_on_chunks_without_preempting_the_planned_ones():
    """A visit's chunks are planned first; each runs with one decode token of every decoding request
    that can have a block without preempting anyone (a later-admitted request's planned chunk keeps
    its blocks); a decode loop of its own waits until no prompt is pending."""
    s = sched(num_blocks=6, budget=8, decode_steps=4)  # 5 usable blocks
    a = FakeRequest(range(8), max_new=8)
    s.add(a)
    assert plan(s) == [(a, 0, 8, True)]
    finish_prefill([a])  # 2 blocks, 8 tokens computed: its next token needs a third block
    assert not s.prefill_pending()
    b = FakeRequest(range(100, 112), max_new=4)
    s.add(b)
    assert s.prefill_pending()
    assert plan(s) == [(b, 0, 8, False)] and s.blocks.num_free == 1 and s.prefill_pending()
    one = s.schedule_decode_one()
    assert one.requests == [a] and one.limits == [9] and len(a.blocks) == 3 and s.blocks.num_free == 0
    s.advance(a, 1)
    a.outputs.append(7)
    a.outputs += [7] * 3  # up to 12 tokens: still its third block
    s.advance(a, 3)
    # a's 13th token needs a fourth block and none is free: it sits out, preempting nobody.
    assert s.schedule_decode_one() is None and b.preemptions == 0 and len(b.blocks) == 2
    s.remove(a)
    assert plan(s) == [(b, 8, 4, True)]
    finish_prefill([b])
    assert not s.prefill_pending()
