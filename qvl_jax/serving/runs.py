"""One HTTP request's n engine requests (its choices) as one stream of text events.

The request's own task (the handler, or the SSE response's body iterator) is the only consumer. Each
choice's engine handle tells of new chunks through `RequestHandle.subscribe` (on the engine's
thread, in order); the callback only hands the chunk to the output processor, one worker thread
shared by all requests, which turns tokens into text with each choice's `OutputStream`
(qvl_jax.engine.output: work per token bounded by the token's bytes and the stop strings' lengths,
never by the answer's), cancels the engine request at a stop string, and hands the text to the
event loop's queue of this request. Text is never made on the event loop (a slow match there once
held up every request, /health included), and no thread waits per choice or per request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

from qvl_jax.engine.output import OutputStream, TokenTable

# The output processor: one worker, so that each choice's chunks are processed in the order given.
_OUTPUT = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qvl-output")


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
    """A choice's end: its RequestOutput, or the error it failed with; and its last text."""

    def __init__(self, item, tail: str = ""):
        self.item, self.tail = item, tail


def _ended(handle) -> _End:
    try:
        return _End(handle.result(timeout=0))
    except BaseException as e:  # the handle's error is the request's, reported to its client
        return _End(e)


@dataclasses.dataclass
class _Piece:
    """A chunk as text: its token count, the text delta, its logprob entries (without a stop id)."""

    n: int
    delta: str
    lps: list


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

    def _process(self, i: int, handle, chunk):
        """The output processor's work on one chunk of choice i (None: its end)."""
        c = self.choices[i]
        if chunk is None:
            end = _ended(handle)
            if isinstance(end.item, BaseException):
                c.error = end.item
                c.out.finish("error")
            else:
                c.result = end.item
                end.tail = c.out.finish(end.item.finish_reason)
            return end
        toks = chunk.tokens.tolist()
        if c.finish is not None:  # stopped by a stop string: the rest is discarded
            return _Piece(len(toks), "", [])
        before = c.out.n_tokens
        delta = c.out.add(toks)
        kept = toks[:c.out.n_tokens - before]
        if isinstance(c.out.stop_reason, str):
            c.handle.cancel()
        lps = []
        if chunk.logprobs is not None:
            lps = [(t, float(chunk.logprobs[j]), chunk.top_token_ids[j].tolist(), chunk.top_logprobs[j].tolist())
                   for j, t in enumerate(kept) if t not in self.stop_ids]
            c.logprobs += lps
        return _Piece(len(toks), delta, lps)

    async def events(self):
        loop, m = asyncio.get_running_loop(), self.metrics
        q: asyncio.Queue = asyncio.Queue()

        def work(i, handle, chunk):  # on the output processor's thread
            item = self._process(i, handle, chunk)
            try:
                loop.call_soon_threadsafe(q.put_nowait, (i, item))
            except RuntimeError:  # the event loop is closed (the server stopped): nobody is listening
                pass

        def tell(i, handle, chunk):  # on the engine's thread: hand over and return
            _OUTPUT.submit(work, i, handle, chunk)

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
                    yield i, item.tail, c.finish, []
                    continue
                now = time.perf_counter()
                if not self.first_token:
                    self.first_token = True
                    m.ttft.observe(now - self.t0)
                    m.waiting.dec()
                    m.running.inc()
                if c.last_t is not None:
                    for _ in range(item.n):
                        m.itl.observe((now - c.last_t) / item.n)
                c.last_t = now
                m.generation_tokens.inc(item.n)
                if item.delta or item.lps:
                    yield i, item.delta, None, item.lps
