"""One HTTP request's n engine requests (its choices) as one stream of text events.

The request's own task (the handler, or the SSE response's body iterator) is the only consumer: it
waits on all its choices at once with `asyncio.wait`. The engine's `RequestHandle` offers a blocking
chunk iterator only, so each choice has at most one `next()` outstanding in the server's chunk pool:
a thread pool as large as the admission limit (no choice waits for a thread, and the default
executor stays free for media loading). Text is made on the event loop by each choice's
`OutputStream` (qvl_jax.engine.output), whose work per token is bounded by the token's bytes and the
stop strings' lengths; at a stop string the engine request is cancelled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import Executor

from qvl_jax.engine.output import OutputStream, TokenTable


@dataclasses.dataclass
class Choice:
    handle: object
    out: OutputStream  # its text so far, stop strings, finish reason
    result: object = None  # the engine's RequestOutput
    error: BaseException | None = None
    last_t: float | None = None
    logprobs: list = dataclasses.field(default_factory=list)  # (token id, logprob, top ids, top logprobs)

    @property
    def finish(self) -> str | None:
        return self.out.finish_reason


class _End:
    def __init__(self, item):
        self.item = item


def _next_chunk(handle, chunks):
    """A handle's next TokenChunk, or at its end _End(its result or error); blocks (chunk pool)."""
    try:
        return next(chunks)
    except StopIteration:
        return _End(handle.result())
    except BaseException as e:  # the handle's error is the request's, reported to its client
        return _End(e)


class Run:
    """The choices behind one HTTP request, as a stream of (index, text delta, finish, logprob entries
    of the new tokens: (id, logprob, top ids, top logprobs), without a stop id)."""

    def __init__(self, handles: list, table: TokenTable, stops: tuple, stop_ids: set[int], t0: float,
                 metrics, pool: Executor, want_logprobs: bool = False):
        self.stop_ids, self.t0, self.metrics, self.pool = stop_ids, t0, metrics, pool
        self.want_logprobs = want_logprobs
        self.choices = [Choice(h, OutputStream(table, stops, stop_ids)) for h in handles]
        self.first_token = False

    def cancel(self) -> None:
        for c in self.choices:
            c.handle.cancel()

    async def events(self):
        loop, m = asyncio.get_running_loop(), self.metrics
        its = [c.handle.chunks() for c in self.choices]

        def ask(i):
            return loop.run_in_executor(self.pool, _next_chunk, self.choices[i].handle, its[i])

        waiting = {ask(i): i for i in range(len(self.choices))}
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for i, item in sorted(((waiting.pop(f), f.result()) for f in done), key=lambda x: x[0]):
                c = self.choices[i]
                if isinstance(item, _End):
                    if isinstance(item.item, BaseException):
                        c.error = item.item
                        c.out.finish("error")
                        yield i, "", c.finish, []
                    else:
                        c.result = item.item
                        yield i, c.out.finish(item.item.finish_reason), c.finish, []
                    continue
                waiting[ask(i)] = i
                now = time.perf_counter()
                if not self.first_token:
                    self.first_token = True
                    m.ttft.observe(now - self.t0)
                    m.waiting.dec()
                    m.running.inc()
                toks = item.tokens.tolist()
                if c.last_t is not None:
                    for _ in range(len(toks)):
                        m.itl.observe((now - c.last_t) / len(toks))
                c.last_t = now
                m.generation_tokens.inc(len(toks))
                if c.finish is not None:  # stopped by a stop string: the rest is discarded
                    continue
                before = c.out.n_tokens
                delta = c.out.add(toks)
                kept = toks[:c.out.n_tokens - before]
                if isinstance(c.out.stop_reason, str):
                    c.handle.cancel()
                lps = []
                if item.logprobs is not None:
                    lps = [(t, float(item.logprobs[j]), item.top_token_ids[j].tolist(), item.top_logprobs[j].tolist())
                           for j, t in enumerate(kept) if t not in self.stop_ids]
                    c.logprobs += lps
                if delta or lps:
                    yield i, delta, None, lps
