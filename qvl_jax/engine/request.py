"""The engine's requests: what a caller holds (`RequestHandle`, `RequestOutput`, `TokenChunk`) and what
the engine keeps of each (`EngineRequest`: prompt layout, settings, tokens so far, slot and blocks)."""

from __future__ import annotations

import dataclasses
import threading
from typing import Iterator

import numpy as np

from qvl_jax.engine.output import OutputStream
from qvl_jax.engine.prefix_cache import block_hash
from qvl_jax.engine.sampling import SamplingFlags
from qvl_jax.modeling.layout import PromptLayout


@dataclasses.dataclass
class RequestOutput:
    """What `handle.result()` returns."""

    tokens: np.ndarray  # [n] int32 new tokens, stop token included
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache (at first admission)
    preemptions: int = 0  # times the request was preempted and recomputed
    queue_s: float = 0.0  # submit -> first admission
    ttft_s: float = 0.0  # submit -> first token
    latency_s: float = 0.0  # submit -> finish
    # With submit(logprobs=k): each new token's log-probability [n] float32, and the k most likely
    # tokens at each step with theirs ([n, k] int32 / float32): the model's log-softmax before
    # penalties, temperature and truncation (as model.generate's return_logprobs). None otherwise.
    logprobs: np.ndarray | None = None
    top_token_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    # With stop strings (SamplingParams.stop): the answer's text, cut before the stop string that
    # ended it (stop_reason; tokens end with the token that completed it). None otherwise.
    text: str | None = None
    stop_reason: str | None = None
    # Speculative decoding (an engine with speculative_config): proposals verified, and accepted.
    proposed_tokens: int = 0
    accepted_tokens: int = 0


@dataclasses.dataclass
class TokenChunk:
    """New tokens as `RequestHandle.chunks()` yields them, with their log-probabilities when the
    request asked for them (fields as in RequestOutput)."""

    tokens: np.ndarray
    logprobs: np.ndarray | None = None
    top_token_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


class RequestHandle:
    """A submitted request: `result()` blocks for its `RequestOutput`, iterating it yields np.int32
    arrays of new tokens as they come (`chunks()` with their log-probabilities), `cancel()` stops it
    and frees its memory. Iterating again, during or after the request, starts from its first token:
    the handle keeps what it handed out. `subscribe` tells a callback of each chunk instead (what the
    server's event loop uses, without a thread per request)."""

    def __init__(self, engine, request_id: int):
        self._engine, self.request_id = engine, request_id
        self._cond = threading.Condition()
        self._deliver = threading.RLock()  # callbacks get chunks one at a time, in order (replay included)
        self._chunks: list[TokenChunk] = []
        self._listeners: list = []
        self._output: RequestOutput | None = None
        self._error: BaseException | None = None
        self._done = False

    def done(self) -> bool:
        return self._done

    def result(self, timeout: float | None = None) -> RequestOutput:
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._output

    def __iter__(self) -> Iterator[np.ndarray]:
        for chunk in self.chunks():
            yield chunk.tokens

    def chunks(self) -> Iterator[TokenChunk]:
        """Yields `TokenChunk`s (new tokens with their log-probabilities) as they come, from the first;
        raises the request's error at the end if it failed."""
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: i < len(self._chunks) or self._done)
                new, done = self._chunks[i:], self._done
            i += len(new)
            yield from new
            if done and not new:
                break
        if self._error is not None:
            raise self._error

    def subscribe(self, callback) -> None:
        """Calls callback(chunk) for each TokenChunk (those already out first) and callback(None) once
        the request is finished (then `result()` returns at once). Called from the engine's thread
        (chunks already out: from this one), one call at a time and in order: keep it short (e.g. hand
        over to an event loop with call_soon_threadsafe)."""
        with self._deliver:
            with self._cond:
                past, done = list(self._chunks), self._done
                if not done:
                    self._listeners.append(callback)
            for chunk in past:
                callback(chunk)
            if done:
                callback(None)

    def cancel(self) -> None:
        if not self._done:
            self._engine._commands.put(("cancel", self))

    # engine side
    def _emit(self, chunk: TokenChunk) -> None:
        with self._deliver:
            with self._cond:
                self._chunks.append(chunk)
                listeners = list(self._listeners)
                self._cond.notify_all()
            for f in listeners:
                f(chunk)

    def _finish(self, output: RequestOutput | None, error: BaseException | None = None) -> None:
        with self._deliver:
            with self._cond:
                if self._done:
                    return
                self._output, self._error, self._done = output, error, True
                listeners, self._listeners = self._listeners, []
                self._cond.notify_all()
            for f in listeners:
                f(None)


@dataclasses.dataclass(eq=False)
class EngineRequest:
    """One request as the engine and its scheduler keep it: the prompt, the settings, the tokens so
    far, and where its keys and values live."""

    handle: RequestHandle
    layout: PromptLayout  # the prompt: ids, positions, rope_delta, its images and videos
    max_new: int
    flags: SamplingFlags
    sp: tuple  # per-request sampling values (numpy scalars, SamplingArrays order)
    key: np.ndarray  # [2] uint32 PRNG key data (row 0 of its seed: as model.generate draws a batch of one)
    stop: np.ndarray  # stop ids (-1 padded)
    submitted: float
    n_top: int | None = None  # logprobs asked for: None (none), or how many alternatives per token
    outputs: list = dataclasses.field(default_factory=list)
    lp: list = dataclasses.field(default_factory=list)  # per output token: (logprob, top ids, top logprobs)
    num_computed: int = 0  # tokens of seq whose keys/values are in the blocks
    blocks: list = dataclasses.field(default_factory=list)
    hashes: list = dataclasses.field(default_factory=list)  # hash chain of the full blocks of seq
    slot: int = -1
    decoding: bool = False
    cached_tokens: int | None = None
    preemptions: int = 0
    admitted: float | None = None
    first_token: float | None = None
    features: tuple | None = None  # (feats, deepstack, items) for the prefill's uncached media
    output: OutputStream | None = None  # its text, when it has stop strings to match
    matcher: object = None  # structured outputs: the grammar state (`structured.Matcher`), advanced per token
    speculate: bool = False  # decoded speculatively (the engine's speculative_config, settings it serves)
    proposed: int = 0  # speculative proposals verified
    accepted: int = 0  # and accepted

    @property
    def prompt(self) -> np.ndarray:
        return self.layout.ids

    @property
    def delta(self) -> int:
        return self.layout.rope_delta

    @property
    def seq_len(self) -> int:
        return len(self.prompt) + len(self.outputs)

    def seq(self, a: int, b: int) -> np.ndarray:
        n = len(self.prompt)
        out = np.asarray(self.outputs[max(0, a - n):max(0, b - n)], np.int32)
        return np.concatenate([self.prompt[a:b], out]) if a < n else out

    def seq_positions(self, a: int, b: int) -> np.ndarray:
        """[3, b - a]: prompt positions, then index + rope_delta for generated tokens."""
        n = len(self.prompt)
        gen = np.arange(max(a, n), b, dtype=np.int32) + self.delta
        return np.concatenate([self.layout.positions[:, a:min(b, n)], np.broadcast_to(gen, (3, len(gen)))], axis=1)

    def block_hashes(self, n_blocks: int, bs: int) -> list[bytes]:
        """The hash chain of the first n_blocks full blocks of the sequence (extended on demand)."""
        while len(self.hashes) < n_blocks:
            i = len(self.hashes)
            a, b = i * bs, (i + 1) * bs
            digests = [m.digest for m in self.layout.items_overlapping(a, b)]
            self.hashes.append(block_hash(self.hashes[-1] if self.hashes else b"", self.seq(a, b), digests))
        return self.hashes[:n_blocks]


def step_logprobs(out, i: int, ran: np.ndarray) -> list | None:
    """Row i's (logprob, top ids, top logprobs) per token it produced in a step's output
    (`steps.Tokens` on the host), or None when the step computed none."""
    if out.logprobs is None:
        return None
    k = 0 if out.top_ids is None else out.top_ids.shape[-1]
    ids = out.top_ids[i][ran] if k else np.zeros((int(ran.sum()), 0), np.int32)
    top = out.top_logprobs[i][ran] if k else np.zeros((int(ran.sum()), 0), np.float32)
    return list(zip(out.logprobs[i][ran], ids, top))


def logprob_fields(n_top: int | None, lp: list) -> dict:
    """RequestOutput / TokenChunk log-probability fields from a request's (logprob, ids, top) list."""
    if n_top is None:
        return {}
    return {"logprobs": np.asarray([x[0] for x in lp], np.float32),
            "top_token_ids": np.asarray([x[1] for x in lp], np.int32).reshape(len(lp), n_top),
            "top_logprobs": np.asarray([x[2] for x in lp], np.float32).reshape(len(lp), n_top)}
