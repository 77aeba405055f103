"""One HTTP request's n engine requests (its choices) as one stream of text events.

The request's own task (the handler, or the SSE response's body iterator) is the only consumer: each
choice's engine handle tells it of new chunks through `RequestHandle.subscribe`, whose callback (on
the engine's thread) only hands the chunk to the event loop's queue of this request, so no thread
waits per choice or per request. Text is made on the event loop by each choice's
`OutputStream` (qvl_jax.engine.output), whose work per token is bounded by the token's bytes and the
stop strings' lengths; at a stop string the engine request is cancelled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
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
    """A choice's end: its RequestOutput, or the error it failed with."""

    def __init__(self, item):
        self.item = item


def _ended(handle) -> _End:
    try:
        return _End(handle.result(timeout=0))
    except BaseException as e:  # the handle's error is the request's, reported to its client
        return _End(e)


class Run:
    """The choices behind one HTTP request, as a stream of (index, text delta, finish, logprob entries
    of the new tokens: (id, logprob, top ids, top logprobs), without a stop id)."""

    def __init__(self, handles: list, table: TokenTable, stops: tuple, stop_ids: set[int], t0: float,
                 metrics, want_logprobs: bool = False):
        self.stop_ids, self.t0, self.metrics = stop_ids, t0, metrics
        self.want_logprobs = want_logprobs
        self.choices = [Choice(h, OutputStream(table, stops, stop_ids)) for h in handles]
        self.first_token = False

    def cancel(self) -> None:
        for c in self.choices:
            c.handle.cancel()

    async def events(self):
        loop, m = asyncio.get_running_loop(), self.metrics
        q: asyncio.Queue = asyncio.Queue()
        def tell(i, handle, chunk):  # on the engine's thread: hand over and return
            try:
                loop.call_soon_threadsafe(q.put_nowait, (i, chunk if chunk is not None else _ended(handle)))
            except RuntimeError:  # the event loop is closed (the server stopped): nobody is listening
                pass

        for i, c in enumerate(self.choices):
            c.handle.subscribe(lambda chunk, i=i, h=c.handle: tell(i, h, chunk))
        left = len(self.choices)
        while left:
            batch = [await q.get()]
            while not q.empty():
                batch.append(q.get_nowait())
            for i, item in sorted(batch, key=lambda x: x[0]):
                c = self.choices[i]
                if isinstance(item, _End):
                    left -= 1
                    if isinstance(item.item, BaseException):
                        c.error = item.item
                        c.out.finish("error")
                        yield i, "", c.finish, []
                    else:
                        c.result = item.item
                        yield i, c.out.finish(item.item.finish_reason), c.finish, []
                    continue
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
