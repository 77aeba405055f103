"""Continuous batching: `Engine` runs many requests over one model with a paged KV cache.

A background thread runs the scheduler. Each visit it (1) spends a token budget on prompt chunks:
first the requests already prefilling, then new ones admitted into free slots (prefix-cache blocks
are taken instead of recomputed); (2) runs up to `decode_steps` decode steps for every decoding
request inside one jitted `lax.while_loop` over those requests (rows padded to a power of two, each
size compiled once) with an active mask, so the host round trip is paid once per chunk; (3) hands
new tokens to their handles and retires finished requests. Requests join and leave at those boundaries.

Memory: blocks come from `BlockManager`. A request that needs a block when none is left preempts the
most recently admitted running requests (their blocks freed, their full blocks kept in the prefix
cache); a preempted request waits at the head of the queue and is recomputed later: prompt and the
tokens generated so far are prefilled again, and generation continues from there. The request that
was admitted first can always finish (the pool holds at least one max_model_len sequence), so
nothing is lost and nothing deadlocks.

Exactness: every request keeps its own 3-D prompt positions and rope_delta (decode position = cache
index + rope_delta), DeepStack features at its visual tokens, its own sampling parameters, stop ids
and PRNG key (token i drawn with fold_in(key, i), as `model.generate` draws it), so its tokens are
those of the same request run alone.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import queue
import sys
import threading
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from qvl_jax.engine import paged, sampling
from qvl_jax.engine.generate import Generator, _image_digests, _INPUT_NAMES, _media_runs
from qvl_jax.engine.paged import PagedView
from qvl_jax.engine.prefix_cache import TRASH_BLOCK, BlockManager, block_hash
from qvl_jax.engine.vision_cache import VisionCache
from qvl_jax.errors import InputError, NumericalError, QvlError, device_free_bytes, device_memory_errors
from qvl_jax.modeling import vision as vision_mod
from qvl_jax.modeling.inputs import bucket_length, prepare_inputs, vision_bucket
from qvl_jax.modeling.model import Structure, vision_tower

MIN_WINDOW = 64  # smallest attention window (tokens) a step reads, as generate's MIN_READ


# ---------------------------------------------------------------------------------------------
# Jitted steps. Both take the model split as (structure, leaves) and merge inside the trace.


MAX_TOP_LOGPROBS = 20  # alternatives a request may ask for per token (OpenAI's limit)


def _choose(flags: sampling.SamplingFlags, logits: jax.Array, sp: sampling.SamplingParams, keys: jax.Array,
            n_out: jax.Array, seen: jax.Array | None, counts: jax.Array | None):
    """One token per row, each row drawn as a batch of one with fold_in(its key, its output index):
    the same draw `model.generate` makes for that request alone. Returns (tokens [r], finite [r],
    logprobs) where logprobs is None, or with flags.logprobs (the chosen token's log-probability
    [r], the top MAX_TOP_LOGPROBS token ids [r, k] and their log-probabilities [r, k]): the model's
    log-softmax before penalties, temperature and truncation, as `model.generate` reports them."""
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    logits = jnp.where(finite[:, None], logits, 0.0)
    plain = dataclasses.replace(flags, logprobs=False)

    def one(kd, step, lg, sp_row, seen_row, count_row):
        key = jax.random.fold_in(jax.random.wrap_key_data(kd), step)
        sp1 = sampling.SamplingParams(*(a[None] for a in sp_row))
        tok, _ = sampling.choose(key, lg[None], sp1, plain, None if seen_row is None else seen_row[None],
                                 None if count_row is None else count_row[None])
        return tok[0]

    tok = jax.vmap(one)(keys, n_out, logits, sp, seen, counts)
    if not flags.logprobs:
        return tok, finite, None
    lsm = jax.nn.log_softmax(logits, axis=-1)
    top_lp, top_ids = jax.lax.top_k(lsm, min(MAX_TOP_LOGPROBS, lsm.shape[-1]))
    return tok, finite, (jnp.take_along_axis(lsm, tok[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top_lp)


def _record_history(flags, seen, counts, rows, tok, live):
    if flags.repetition:
        seen = seen.at[rows, tok].max(live)
    if flags.frequency_presence:
        counts = counts.at[rows, tok].add(live.astype(jnp.int32))
    return seen, counts


@functools.partial(jax.jit, static_argnames=("structure", "flags", "block_size"),
                   donate_argnames=("pages", "seen", "counts"))
def prefill_chunk(structure: Structure, leaves: list, flags: sampling.SamplingFlags, block_size: int,
                  pages: paged.Pages, seen: jax.Array, counts: jax.Array, ids: jax.Array, positions: jax.Array,
                  start: jax.Array, n_tok: jax.Array, table: jax.Array, vision, slot: jax.Array, final: jax.Array,
                  sp: sampling.SamplingParams, keys: jax.Array, n_out: jax.Array):
    """Writes a chunk of each row's sequence (ids [p, t], the first n_tok real, at sequence index
    start) into its pages and chooses the next token from the last real position's logits (kept
    by the host only for rows whose chunk ends the known sequence: `final`)."""
    m = structure.merge(leaves)
    p, t = ids.shape
    window = table.shape[1] * block_size
    index = start[:, None] + jnp.arange(t)[None]  # [p, t] sequence index of each query
    real = jnp.arange(t)[None] < n_tok[:, None]
    write = jnp.where(real, paged.slots(table, jnp.minimum(index, window - 1), block_size), TRASH_BLOCK)
    j = jnp.arange(window)
    read = paged.slots(table, jnp.broadcast_to(j, (p, window)), block_size)
    mask = (j[None, None, :] <= index[:, :, None]) & (j[None, None, :] < (start + n_tok)[:, None, None])
    x, deepstack = m.embed_inputs(ids, vision)
    h, view = m.model.language_model(x, positions, mask, deepstack, PagedView(pages, write, read))
    last = jnp.take_along_axis(h, (n_tok - 1)[:, None, None], axis=1)
    logits = m.lm_logits(last)[:, 0].astype(jnp.float32)
    rows_seen = seen[slot] if flags.repetition else None
    rows_counts = counts[slot] if flags.frequency_presence else None
    tok, finite, lps = _choose(flags, logits, sp, keys, n_out, rows_seen, rows_counts)
    seen, counts = _record_history(flags, seen, counts, slot, tok, final & finite)
    return view.pages, seen, counts, tok, finite, lps


@functools.partial(jax.jit, static_argnames=("structure", "flags", "block_size", "n_steps"),
                   donate_argnames=("pages", "windows", "seen", "counts"))
def decode_chunk(structure: Structure, leaves: list, flags: sampling.SamplingFlags, block_size: int, n_steps: int,
                 pages: paged.Pages, windows: tuple, seen: jax.Array, counts: jax.Array, slot: jax.Array,
                 table: jax.Array, seq_len: jax.Array,
                 last_tok: jax.Array, delta: jax.Array, active: jax.Array, limit: jax.Array, n_out: jax.Array,
                 max_new: jax.Array, stop_ids: jax.Array, sp: sampling.SamplingParams, keys: jax.Array):
    """Up to n_steps decode steps over a batch of rows in one `lax.while_loop`; row i is the request
    in slot[i] (its penalty history row; idle padding rows are inactive). A row runs while it is
    active: not stopped, under its max_new, and with room in its blocks (`limit`, its sequence
    length cap for this chunk). Returns the pages, the window buffers, the penalty history, tokens
    [rows, n_steps] (-1 where a row did not run), which rows met non-finite logits, and with
    flags.logprobs each step's (chosen logprob [rows, n_steps], top ids and logprobs [rows, n_steps,
    k]), else None.
    windows: () or buffers of `paged.window_buffers` for these rows and this window: each row's
    attention window is then gathered into them once before the loop and kept current
    (`paged.PagedView`'s windows) instead of gathered every step; returned, to be passed again."""
    m = structure.merge(leaves)
    s = table.shape[0]
    window = table.shape[1] * block_size
    j = jnp.arange(window)
    read = paged.slots(table, jnp.broadcast_to(j, (s, window)), block_size)

    def body(c):
        step, pages, windows, seen, counts, seq_len, last_tok, n_out, active, out, bad, lp_out = c
        pos = seq_len + delta
        positions = jnp.broadcast_to(pos[None, :, None], (3, s, 1))
        write = jnp.where(active, paged.slots(table, jnp.minimum(seq_len, window - 1)[:, None], block_size)[:, 0],
                          TRASH_BLOCK)
        mask = (j[None] <= seq_len[:, None])[:, None, :]
        view = PagedView(pages, write[:, None], read, table, seq_len + 1, windows, jnp.where(active, seq_len, window))
        h, view = m.model.language_model(m.embed(last_tok[:, None]), positions, mask, None, view)
        logits = m.lm_logits(h)[:, 0].astype(jnp.float32)
        tok, finite, lps = _choose(flags, logits, sp, keys, n_out, seen[slot] if flags.repetition else None,
                                   counts[slot] if flags.frequency_presence else None)
        if lps is not None:
            lp_out = tuple(buf.at[:, step].set(v) for buf, v in zip(lp_out, lps))
        tok = jnp.where(active, tok, last_tok)
        seen, counts = _record_history(flags, seen, counts, slot, tok, active & finite)
        out = out.at[:, step].set(jnp.where(active, tok, -1))
        seq_len = seq_len + active
        n_out = n_out + active
        stopped = jnp.any(tok[:, None] == stop_ids, axis=1)
        bad = bad | (active & ~finite)
        active = active & finite & ~stopped & (n_out < max_new) & (seq_len < limit)
        return step + 1, view.pages, view.windows, seen, counts, seq_len, tok, n_out, active, out, bad, lp_out

    k = min(MAX_TOP_LOGPROBS, m.config.text.vocab_size) if flags.logprobs else 0
    lp_init = () if not flags.logprobs else (jnp.zeros((s, n_steps), jnp.float32),
                                             jnp.zeros((s, n_steps, k), jnp.int32),
                                             jnp.zeros((s, n_steps, k), jnp.float32))
    windows = paged.gather_windows(pages, read, windows) if windows else ()
    init = (jnp.zeros((), jnp.int32), pages, windows, seen, counts, seq_len, last_tok, n_out, active,
            jnp.full((s, n_steps), -1, jnp.int32), jnp.zeros((s,), bool), lp_init)
    c = jax.lax.while_loop(lambda c: (c[0] < n_steps) & jnp.any(c[8]), body, init)
    return c[1], c[2], c[3], c[4], c[9], c[10], c[11] or None


@functools.partial(jax.jit, donate_argnames=("seen", "counts"))
def _set_history(seen, counts, slot, hist, n_prompt):
    """Resets a slot's penalty history: seen = every known token, counts = the generated ones."""
    valid = hist >= 0
    idx = jnp.where(valid, hist, 0)
    seen = seen.at[slot].set(jnp.zeros(seen.shape[1], bool).at[idx].max(valid))
    is_out = valid & (jnp.arange(hist.shape[0]) >= n_prompt)
    counts = counts.at[slot].set(jnp.zeros(counts.shape[1], jnp.int32).at[idx].add(is_out.astype(jnp.int32)))
    return seen, counts


# ---------------------------------------------------------------------------------------------
# Requests and handles


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


@dataclasses.dataclass
class TokenChunk:
    """New tokens as `RequestHandle.chunks()` yields them, with their log-probabilities when the
    request asked for them (fields as in RequestOutput)."""

    tokens: np.ndarray
    logprobs: np.ndarray | None = None
    top_token_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


_DONE = object()


class RequestHandle:
    """A submitted request: `result()` blocks for its `RequestOutput`, iterating it yields np.int32
    arrays of new tokens as they come, `cancel()` stops it and frees its memory."""

    def __init__(self, engine: "Engine", request_id: int):
        self._engine, self.request_id = engine, request_id
        self._event = threading.Event()
        self._stream: queue.Queue = queue.Queue()
        self._output: RequestOutput | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._event.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._output

    def __iter__(self) -> Iterator[np.ndarray]:
        for chunk in self.chunks():
            yield chunk.tokens

    def chunks(self) -> Iterator[TokenChunk]:
        """Yields `TokenChunk`s (new tokens with their log-probabilities) as they come."""
        while True:
            item = self._stream.get()
            if item is _DONE:
                break
            yield item
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        if not self._event.is_set():
            self._engine._commands.put(("cancel", self))

    # scheduler side
    def _emit(self, chunk: TokenChunk) -> None:
        self._stream.put(chunk)

    def _finish(self, output: RequestOutput | None, error: BaseException | None = None) -> None:
        if self._event.is_set():
            return
        self._output, self._error = output, error
        self._stream.put(_DONE)
        self._event.set()


@dataclasses.dataclass(eq=False)
class _Media:
    start: int  # token span of its placeholders (a video: first to last temporal step)
    end: int
    digest: str
    grid: np.ndarray  # [3]
    pixels: np.ndarray  # [patches, patch_dim]
    feat_offset: int  # its first row in prepare_inputs' feature order (images, then videos)
    n_feats: int


@dataclasses.dataclass(eq=False)
class _Request:
    handle: RequestHandle
    prompt: np.ndarray  # [n] int32
    positions: np.ndarray  # [3, n] prompt rope positions
    delta: int
    feat_index: np.ndarray | None  # [n] prepare_inputs' feature row of each token, -1 elsewhere
    media: list[_Media]
    max_new: int
    flags: sampling.SamplingFlags
    sp: tuple  # per-request sampling values (numpy scalars, SamplingParams order)
    key: np.ndarray  # [2] uint32 PRNG key data
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
    features: tuple | None = None  # (feats, deepstack, remap) for the prefill's uncached media

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
        return np.concatenate([self.positions[:, a:min(b, n)], np.broadcast_to(gen, (3, len(gen)))], axis=1)

    def block_hashes(self, n_blocks: int, bs: int) -> list[bytes]:
        """The hash chain of the first n_blocks full blocks of the sequence (extended on demand)."""
        while len(self.hashes) < n_blocks:
            i = len(self.hashes)
            a, b = i * bs, (i + 1) * bs
            digests = [m.digest for m in self.media if m.start < b and m.end > a]
            self.hashes.append(block_hash(self.hashes[-1] if self.hashes else b"", self.seq(a, b), digests))
        return self.hashes[:n_blocks]


# ---------------------------------------------------------------------------------------------
# The engine


def _round_down(n: int) -> int:
    """n rounded down to two significant bits (2^k or 3 * 2^(k-1)). The pool's size is part of every
    compiled step's shapes, and free memory (host RAM on the CPU) moves by a few percent between
    starts: unrounded, each start compiled everything anew and the persistent compilation cache never
    served a second one."""
    if n < 4:
        return n
    shift = n.bit_length() - 2
    return (n >> shift) << shift


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class Engine:
    """Continuous batching over a paged KV cache. Build with `model.engine(...)`.

    max_num_seqs: decode slots (requests running at once). max_model_len: longest prompt + output
    (default: the model's context, at most 8192). block_size: tokens per KV block. num_blocks: the
    pool (default: what `memory_fraction` of free device memory holds, rounded down to two
    significant bits so that it, and with it every compiled shape, is the same from one start to the
    next; at most enough for every slot at max_model_len). max_num_batched_tokens: prompt tokens
    prefilled per scheduler visit (chunked prefill: a long prompt does not stall the running
    decodes). decode_steps: decode steps per jitted loop between scheduler visits. prefix_caching:
    reuse full blocks of identical prefixes. vision_cache_bytes: memory for cached image / video
    features. window_copy_bytes: a decode loop whose rows' attention windows (every layer's keys and
    values) fit in this many bytes gathers them once per loop, into buffers kept beside the pool,
    rather than once per step (the same numbers, faster; 0: never)."""

    def __init__(self, model, max_num_seqs: int = 16, max_model_len: int | None = None, block_size: int = 16,
                 num_blocks: int | None = None, max_num_batched_tokens: int = 512, decode_steps: int = 8,
                 memory_fraction: float = 0.5, prefix_caching: bool = True, vision_cache_bytes: int = 256 << 20,
                 window_copy_bytes: int = 1 << 30):
        self.model = model
        self.cfg = model.config
        self._gen = Generator(model)  # request and sampling checks shared with model.generate
        text = self.cfg.text
        self.max_num_seqs = _positive_int("max_num_seqs", max_num_seqs)
        self.block_size = _positive_int("block_size", block_size)
        limit = text.max_position_embeddings
        self.max_model_len = _positive_int("max_model_len", min(limit, 8192) if max_model_len is None else max_model_len, 2)
        if self.max_model_len > limit:
            raise InputError(f"max_model_len={self.max_model_len} exceeds the model's context of {limit} tokens")
        self.max_num_batched_tokens = _positive_int("max_num_batched_tokens", max_num_batched_tokens)
        self.decode_steps = _positive_int("decode_steps", decode_steps)
        self.window_copy_bytes = _positive_int("window_copy_bytes", window_copy_bytes, 0)
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        need_one = self.max_blocks_per_seq + 1  # one full-length sequence and the trash block
        if num_blocks is None:
            if not 0 < memory_fraction <= 1:
                raise InputError(f"memory_fraction must lie in (0, 1], got {memory_fraction!r}")
            per_block = paged.block_bytes(text, self.block_size, model.dtype)
            free = device_free_bytes()
            fit = need_one if free is None else _round_down(int(free * memory_fraction) // per_block)
            num_blocks = max(need_one, min(fit, self.max_num_seqs * self.max_blocks_per_seq + 1))
        self.num_blocks = _positive_int("num_blocks", num_blocks, 2)
        if self.num_blocks < need_one:
            raise InputError(f"num_blocks={self.num_blocks} cannot hold one sequence of max_model_len="
                             f"{self.max_model_len} ({need_one} blocks of {self.block_size} tokens with the "
                             "reserved one)")
        paged.kernel()  # a bad QVL_JAX_PAGED_ATTENTION is a ConfigError here, not inside the loop
        self._prefix_caching, self._vision_cache_bytes = prefix_caching, vision_cache_bytes
        self._reset_device_state()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []  # admission order (preemption victims from the end)
        self._commands: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.stats = collections.Counter()  # prefill_tokens, decode_tokens, decode_chunks, preemptions, ...

    def _reset_device_state(self) -> None:
        """Fresh pages, penalty history, block pool and caches (at start, and after a failed step,
        whose donated buffers may be gone)."""
        text, s = self.cfg.text, self.max_num_seqs
        self._pages = self._windows = None  # the old pool's memory goes before the new one is allocated
        self.blocks = BlockManager(self.num_blocks, self.block_size, self._prefix_caching)
        self.vision_cache = VisionCache(self._vision_cache_bytes)
        self._pages = paged.allocate(text, self.num_blocks, self.block_size, self.model.dtype,
                                     getattr(self.model, "mesh", None))
        self._seen = jnp.zeros((s, text.vocab_size), bool)
        self._counts = jnp.zeros((s, text.vocab_size), jnp.int32)
        self._table = np.zeros((s, self.max_blocks_per_seq), np.int32)
        self._free_slots = list(range(s))

    # -- public API -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a request could be given now (free, or cached and unreferenced)."""
        return self.blocks.num_free

    def submit(self, inputs: dict, max_new_tokens: int = 64, **sampling_kw) -> RequestHandle:
        """Queues one prompt (a processor's output, batch of one, HF names) with its own sampling
        arguments (as `model.generate` takes them: temperature, top_k, top_p, min_p, the penalties,
        seed, stop_token_ids, pad_token_id). Returns at once; safe from any thread. A bad request
        gets a handle whose `result()` raises the one-line typed error; the others run on."""
        with self._lock:
            if self._closed:
                raise QvlError("the engine is closed")
            handle = RequestHandle(self, next(self._ids))
        try:
            req = self._make_request(handle, inputs, max_new_tokens, sampling_kw)
        except QvlError as e:
            handle._finish(None, e.with_traceback(None))
            return handle
        with self._lock:
            self._commands.put(("submit", req))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="qvl-engine", daemon=True)
                self._thread.start()
        return handle

    def generate(self, inputs: list[dict], max_new_tokens: int = 64, progress: bool | None = None,
                 return_exceptions: bool = False, **sampling_kw) -> list[RequestOutput]:
        """Offline batch: submits every prompt, returns their outputs in order (a progress bar on a
        terminal). A failed request raises its error once all are done, or with
        return_exceptions=True stands in the list as its exception."""
        handles = [self.submit(inp, max_new_tokens, **sampling_kw) for inp in inputs]
        if progress is None:
            progress = sys.stderr.isatty()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(handles), desc="generate", unit="req")
        out = []
        for h in handles:
            try:
                out.append(h.result())
            except QvlError as e:
                out.append(e)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if not return_exceptions:
            for r in out:
                if isinstance(r, BaseException):
                    raise r
        return out

    def close(self) -> None:
        """Stops the scheduler; unfinished requests end as cancelled."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._commands.put(("close", None))
        if thread is not None:
            thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- request checks (caller's thread) ----------------------------------------------------------
    def _make_request(self, handle, inputs, max_new_tokens, kw) -> _Request:
        if not isinstance(inputs, dict) and not hasattr(inputs, "keys"):
            raise InputError(f"submit takes a dict of model inputs (a processor's output), got {type(inputs).__name__}")
        inputs = dict(inputs)
        unknown = set(inputs) - set(_INPUT_NAMES)
        if unknown:
            raise InputError(f"unknown input(s): {', '.join(sorted(unknown))}")
        if inputs.get("input_ids") is None:
            raise InputError("submit needs input_ids")
        cfg = self.cfg
        first = prepare_inputs(cfg, **inputs)
        if first.input_ids.shape[0] != 1:
            raise InputError(f"submit takes one prompt (a batch of one); got a batch of {first.input_ids.shape[0]}: "
                             "submit each row, or use engine.generate")
        ids = first.input_ids[0][first.mask[0] > 0]
        inputs = dict(inputs, input_ids=ids[None], attention_mask=None, mm_token_type_ids=None)
        prep = prepare_inputs(cfg, **inputs)
        n = len(ids)
        max_new = max_new_tokens
        n_top = kw.pop("logprobs", None)
        if n_top is not None and (isinstance(n_top, bool) or not isinstance(n_top, (int, np.integer))
                                  or not 0 <= n_top <= MAX_TOP_LOGPROBS):
            raise InputError(f"logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}] (alternatives per "
                             f"token), got {n_top!r}")
        ctl, flags, key = self._gen._controls(1, max_new, kw.pop("stop_token_ids", None), kw.pop("pad_token_id", None),
                                              kw, n_top is not None)
        if n + max_new > self.max_model_len:
            raise InputError(f"prompt of {n} tokens + max_new_tokens={max_new} = {n + max_new} exceeds the "
                             f"engine's max_model_len of {self.max_model_len}")
        img_grid, vid_grid = inputs.get("image_grid_thw"), inputs.get("video_grid_thw")
        media = []
        if prep.feat_index is not None:
            group = cfg.vision.spatial_merge_size ** 2
            digests = {"image": _image_digests(inputs.get("pixel_values"), img_grid),
                       "video": _image_digests(inputs.get("pixel_values_videos"), vid_grid)}
            grids = {"image": None if img_grid is None else np.asarray(img_grid, np.int64),
                     "video": None if vid_grid is None else np.asarray(vid_grid, np.int64)}
            pixels = {"image": inputs.get("pixel_values"), "video": inputs.get("pixel_values_videos")}
            n_img_feats = 0 if img_grid is None else int(grids["image"].prod(-1).sum()) // group
            for kind, i, a, b in _media_runs(ids, cfg, img_grid, vid_grid):
                g = grids[kind]
                patch0 = int(g[:i].prod(-1).sum())
                feat0 = patch0 // group + (n_img_feats if kind == "video" else 0)
                media.append(_Media(a, b, digests[kind][i], g[i],
                                    np.asarray(pixels[kind])[patch0:patch0 + int(g[i].prod())], feat0,
                                    int(g[i].prod()) // group))
        sp = tuple(np.asarray(a)[0] for a in ctl.sampling)
        return _Request(handle=handle, prompt=ids.astype(np.int32), positions=prep.positions[:, 0].astype(np.int32),
                        delta=int(prep.rope_delta[0]),
                        feat_index=None if prep.feat_index is None else prep.feat_index[0],
                        media=media, max_new=int(max_new), flags=flags, sp=sp,
                        key=np.asarray(jax.random.key_data(key), np.uint32), stop=np.asarray(ctl.stop_ids),
                        submitted=time.perf_counter(), n_top=None if n_top is None else int(n_top))

    # -- scheduler thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            idle = not (self._waiting or self._running)
            if not self._drain(block=idle):
                break
            if not (self._waiting or self._running):
                continue
            try:
                with device_memory_errors("engine step"):
                    self._step()
            except Exception as e:  # a failure of the step itself: fail what was in flight, keep serving
                err = e if isinstance(e, QvlError) else QvlError(f"engine step failed: {type(e).__name__}: "
                                                                 f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}")
                for req in list(self._running) + list(self._waiting):
                    self._retire(req, error=err)
                self._reset_device_state()

    def _drain(self, block: bool) -> bool:
        """Takes queued submissions and cancellations; False once closed."""
        while True:
            try:
                cmd, arg = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if cmd == "submit":
                self._waiting.append(arg)
            elif cmd == "cancel":
                req = next((r for r in itertools.chain(self._running, self._waiting) if r.handle is arg), None)
                if req is not None:
                    self._retire(req, reason="cancelled")
            elif cmd == "close":
                for req in list(self._running) + list(self._waiting):
                    self._retire(req, reason="cancelled")
                # Submissions that raced with close end as cancelled too.
                while not self._commands.empty():
                    c, a = self._commands.get()
                    if c == "submit":
                        a.handle._finish(self._output(a, "cancelled"))
                return False

    def _step(self) -> None:
        t0 = time.perf_counter()
        if self._prefill_phase():
            # A prefill chunk that is not a prompt's last returns nothing to the host, so its work would
            # otherwise still run when the decode phase starts and be counted there: wait for it, so
            # that prefill_s / decode_s split the time truthfully (a wait the decode phase does anyway).
            jax.block_until_ready(self._pages)
        t1 = time.perf_counter()
        self._decode_phase()
        self.stats["steps"] += 1
        self.stats["prefill_s"] += t1 - t0
        self.stats["decode_s"] += time.perf_counter() - t1

    # -- block bookkeeping --------------------------------------------------------------------------
    def _window_blocks(self, n_tokens: int) -> int:
        """Blocks an attention window reads: a power-of-two bucket (each compiles once)."""
        n = max(-(-n_tokens // self.block_size), -(-MIN_WINDOW // self.block_size))
        return min(self.max_blocks_per_seq, 1 << (n - 1).bit_length())

    def _grant(self, req: _Request, want: int, may_preempt: bool) -> int:
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
                self._table[req.slot, len(req.blocks):len(req.blocks) + len(got)] = got
                req.blocks += got
            if len(got or []) == need:
                return want
            if may_preempt:
                later = self._running[self._running.index(req) + 1:]
                if later:
                    self._preempt(later[-1])
                    continue
            return max(0, len(req.blocks) * bs - req.num_computed)

    def _register_full_blocks(self, req: _Request) -> None:
        n_full = min(req.num_computed // self.block_size, len(req.blocks))
        for i, h in enumerate(req.block_hashes(n_full, self.block_size)):
            self.blocks.register(req.blocks[i], h)

    def _free(self, req: _Request) -> None:
        if req.blocks:
            self._register_full_blocks(req)
            self.blocks.release(req.blocks)
        req.blocks = []
        req.features = None
        if req.slot >= 0:
            self._table[req.slot] = TRASH_BLOCK
            self._free_slots.append(req.slot)
            req.slot = -1
        if req in self._running:
            self._running.remove(req)

    def _preempt(self, req: _Request) -> None:
        """Frees req's memory; it waits at the head of the queue and is recomputed later."""
        self._free(req)
        req.num_computed = 0
        req.decoding = False
        req.preemptions += 1
        self.stats["preemptions"] += 1
        self._waiting.appendleft(req)

    def _output(self, req: _Request, reason: str) -> RequestOutput:
        now = time.perf_counter()
        return RequestOutput(
            tokens=np.asarray(req.outputs, np.int32), finish_reason=reason, prompt_tokens=len(req.prompt),
            cached_tokens=req.cached_tokens or 0, preemptions=req.preemptions,
            queue_s=(req.admitted or now) - req.submitted, ttft_s=(req.first_token or now) - req.submitted,
            latency_s=now - req.submitted, **_logprob_fields(req.n_top, req.lp))

    def _retire(self, req: _Request, reason: str = "", error: BaseException | None = None) -> None:
        self._free(req)
        if req in self._waiting:
            self._waiting.remove(req)
        req.handle._finish(None if error is not None else self._output(req, reason), error)

    # -- prefill ------------------------------------------------------------------------------------
    def _prefill_phase(self) -> bool:
        """Prefill chunks within the token budget; whether any ran."""
        budget = self.max_num_batched_tokens
        for req in list(self._running):
            if budget <= 0:
                break
            if req.decoding or req not in self._running:
                continue
            n = self._grant(req, min(req.seq_len - req.num_computed, budget), may_preempt=True)
            if n:
                self._prefill(req, n)
                budget -= n
        while budget > 0 and self._waiting and self._free_slots:
            req = self._waiting[0]
            n = self._admit(req, budget)
            if not n:
                break
            self._prefill(req, n)
            budget -= n
        return budget < self.max_num_batched_tokens

    def _admit(self, req: _Request, budget: int) -> int:
        """Gives req a slot and its cached prefix blocks; the tokens it may prefill now (0: it stays
        waiting, holding nothing)."""
        bs = self.block_size
        n_hashable = (req.seq_len - 1) // bs  # the last known token is always computed
        hit = self.blocks.match(req.block_hashes(n_hashable, bs))
        slot = self._free_slots.pop(0)
        req.slot, req.blocks, req.num_computed = slot, list(hit), len(hit) * bs
        self._table[slot] = TRASH_BLOCK
        self._table[slot, :len(hit)] = hit
        self._running.append(req)
        n = self._grant(req, min(req.seq_len - req.num_computed, budget), may_preempt=False)
        if n == 0:
            self._free(req)
            req.num_computed = 0
            return 0
        self._waiting.popleft()
        if req.cached_tokens is None:
            req.cached_tokens = req.num_computed
            req.admitted = time.perf_counter()
        self.stats["cached_tokens"] += req.num_computed
        return n

    def _features(self, req: _Request):
        """(feats, deepstack, remap) of the media the uncached part of the prompt needs: cached ones
        from the vision cache, the rest through one tower call; remap takes prepare_inputs' feature
        row to a row of feats (-1: not needed)."""
        need = [m for m in req.media if m.end > req.num_computed]
        got: dict[int, tuple] = {}
        miss = []
        for i, m in enumerate(need):
            hit = self.vision_cache.get(m.digest)
            if hit is None:
                miss.append(i)
            else:
                got[i] = hit
        if miss:
            # Images before videos, as prepare_inputs orders features: a request whose media are all
            # new runs the tower exactly as model.generate does.
            order = sorted(miss, key=lambda i: need[i].feat_offset)
            grids = vision_mod.check_grid_thw(np.stack([need[i].grid for i in order]), self.cfg.vision, "grid_thw")
            pix = np.concatenate([need[i].pixels for i in order])
            vis = vision_mod.VisionInputs.build(pix, grids, self.cfg.vision, vision_bucket(int(grids.prod(-1).sum())))
            feats, deepstack = vision_tower(*self.model.split, vis)
            self.stats["vision_encoded"] += len(order)
            at = 0
            for i in order:
                m = need[i]
                f, d = feats[at:at + m.n_feats], deepstack[:, at:at + m.n_feats]
                at += m.n_feats
                got[i] = (f, d)
                self.vision_cache.put(m.digest, f, d)
        total = 0 if req.feat_index is None else int(req.feat_index.max()) + 1
        remap = np.full(total, -1, np.int32)
        parts, ds_parts, row = [], [], 0
        for i, m in enumerate(need):
            f, d = got[i]
            remap[m.feat_offset:m.feat_offset + m.n_feats] = row + np.arange(m.n_feats)
            parts.append(f)
            ds_parts.append(d)
            row += m.n_feats
        rows = bucket_length(row, 16)
        feats = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
        deepstack = jnp.concatenate(ds_parts, axis=1) if len(ds_parts) > 1 else ds_parts[0]
        feats = jnp.pad(feats, ((0, rows - row), (0, 0)))
        deepstack = jnp.pad(deepstack, ((0, 0), (0, rows - row), (0, 0)))
        return feats, deepstack, remap

    def _prefill(self, req: _Request, n: int) -> None:
        o = req.num_computed
        end = o + n
        final = end == req.seq_len
        # Four length buckets an octave: a chunk pads by under an eighth, not up to a power of two (a
        # 300-token chunk ran as 512 tokens; under a shared budget most chunks are such remainders).
        t = bucket_length(n, 16, per_octave=4)
        ids = np.zeros((1, t), np.int32)
        ids[0, :n] = req.seq(o, end)
        positions = np.zeros((3, 1, t), np.int32)
        positions[:, 0, :n] = req.seq_positions(o, end)
        vision = None
        if req.feat_index is not None:
            index = np.full(t, -1, np.int32)
            index[:max(0, min(end, len(req.prompt)) - o)] = req.feat_index[o:min(end, len(req.prompt))]
            if (index >= 0).any():
                if req.features is None:
                    req.features = self._features(req)
                feats, deepstack, remap = req.features
                index = np.where(index >= 0, remap[np.maximum(index, 0)], -1)
                vision = (feats, deepstack, jnp.asarray(index[None]))
        slot = req.slot
        if final and req.flags.penalties:
            hist = np.full(bucket_length(req.seq_len, 16), -1, np.int32)
            hist[:req.seq_len] = req.seq(0, req.seq_len)
            self._seen, self._counts = _set_history(self._seen, self._counts, jnp.int32(slot), jnp.asarray(hist),
                                                    jnp.int32(len(req.prompt)))
        rb = self._window_blocks(end)
        sp = sampling.SamplingParams(*(jnp.asarray(np.asarray(v)[None]) for v in req.sp))
        self._pages, self._seen, self._counts, tok, finite, lps = prefill_chunk(
            *self.model.split, req.flags, self.block_size, self._pages, self._seen, self._counts,
            jnp.asarray(ids), jnp.asarray(positions), jnp.asarray([o], jnp.int32), jnp.asarray([n], jnp.int32),
            jnp.asarray(self._table[slot:slot + 1, :rb]), vision, jnp.asarray([slot], jnp.int32),
            jnp.asarray([final]), sp, jnp.asarray(req.key[None]), jnp.asarray([len(req.outputs)], jnp.int32))
        req.num_computed = end
        self.stats["prefill_tokens"] += n
        self.stats["prefill_padded_tokens"] += t
        self._register_full_blocks(req)
        if not final:
            return
        req.features = None  # the vision cache keeps what may be needed again
        tok, finite, lps = jax.device_get((tok, finite, lps))
        if not finite[0]:
            self._retire(req, error=NumericalError("the model produced NaN/inf logits (prefill); check the "
                                                   "weights, or use float32 if a low-precision dtype overflowed"))
            return
        req.decoding = True
        self._accept(req, [int(tok[0])], None if lps is None else [tuple(a[0] for a in lps)])

    def _accept(self, req: _Request, toks: list[int], lps: list | None = None) -> None:
        """Appends new tokens (and their log-probabilities when req asked), streams them, and retires
        req when it stopped."""
        if not toks:
            return
        if req.first_token is None:
            req.first_token = time.perf_counter()
        req.outputs += toks
        new = []
        if req.n_top is not None:
            new = [(float(lp), ids[:req.n_top], top[:req.n_top]) for lp, ids, top in lps]
            req.lp += new
        req.handle._emit(TokenChunk(np.asarray(toks, np.int32), **_logprob_fields(req.n_top, new)))
        if toks[-1] in set(req.stop[req.stop >= 0].tolist()):
            self._retire(req, "stop")
        elif len(req.outputs) >= req.max_new:
            self._retire(req, "length")

    # -- decode -------------------------------------------------------------------------------------
    def _window_buffers(self, rows: int, window: int) -> tuple:
        """The decode loop's window buffers for rows x window tokens, or () where they would exceed
        window_copy_bytes (or the kernel reads the pages itself). One set is kept between loops, so
        that a loop writes into memory already touched (fresh memory of that size cost more page
        faults than the gathers it saves)."""
        if paged.kernel() != "xla" or paged.block_bytes(self.cfg.text, rows * window,
                                                        self.model.dtype) > self.window_copy_bytes:
            return ()
        kept, self._windows = self._windows, None  # donated to the loop, which hands them back
        if kept is not None and kept[:2] == (rows, window):
            return kept[2]
        del kept  # the old set's memory goes first
        return paged.window_buffers(self.cfg.text, rows, window, self.model.dtype, getattr(self.model, "mesh", None))

    def _decode_phase(self) -> None:
        k = self.decode_steps
        for req in [r for r in self._running if r.decoding]:
            if req in self._running:
                # The token to feed sits at seq_len - 1; room for up to k of them.
                self._grant(req, min(k, req.max_new - len(req.outputs)), may_preempt=True)
        dec = [r for r in self._running if r.decoding]
        if not dec:
            return
        # Only the decoding requests run, padded to a power of two rows (each size compiles once):
        # one request alone costs one row, not max_num_seqs.
        s, bs = min(self.max_num_seqs, 1 << (len(dec) - 1).bit_length()), self.block_size
        slot = np.zeros(s, np.int32)  # padding rows: inactive, their history writes are no-ops
        table = np.full((s, self._table.shape[1]), TRASH_BLOCK, np.int32)
        seq_len = np.zeros(s, np.int32)
        last_tok = np.zeros(s, np.int32)
        delta = np.zeros(s, np.int32)
        active = np.zeros(s, bool)
        limit = np.zeros(s, np.int32)
        n_out = np.zeros(s, np.int32)
        max_new = np.zeros(s, np.int32)
        n_stop = max(len(r.stop) for r in dec)
        stop = np.full((s, n_stop), -1, np.int32)
        sp = [np.array([v], np.asarray(v).dtype).repeat(s) for v in _NEUTRAL]
        keys = np.zeros((s, 2), np.uint32)
        for i, r in enumerate(dec):
            slot[i] = r.slot
            table[i] = self._table[r.slot]
            seq_len[i] = r.num_computed
            last_tok[i] = r.outputs[-1]
            delta[i] = r.delta
            limit[i] = min(len(r.blocks) * bs, r.num_computed + k)
            active[i] = seq_len[i] < limit[i]
            n_out[i] = len(r.outputs)
            max_new[i] = r.max_new
            stop[i, :len(r.stop)] = r.stop
            for field, v in zip(sp, r.sp):
                field[i] = v
            keys[i] = r.key
        if not active.any():
            return
        flags = sampling.SamplingFlags(**{f.name: any(getattr(r.flags, f.name) for r in dec)
                                          for f in dataclasses.fields(sampling.SamplingFlags)})
        rb = self._window_blocks(int(limit.max()))
        windows = self._window_buffers(s, rb * bs)
        self._pages, windows, self._seen, self._counts, out, bad, lps = decode_chunk(
            *self.model.split, flags, bs, k, self._pages, windows, self._seen, self._counts, jnp.asarray(slot),
            jnp.asarray(table[:, :rb]), jnp.asarray(seq_len), jnp.asarray(last_tok), jnp.asarray(delta),
            jnp.asarray(active), jnp.asarray(limit), jnp.asarray(n_out), jnp.asarray(max_new), jnp.asarray(stop),
            sampling.SamplingParams(*(jnp.asarray(a) for a in sp)), jnp.asarray(keys))
        if windows:
            self._windows = (s, rb * bs, windows)
        out, bad, lps = jax.device_get((out, bad, lps))
        self.stats["decode_chunks"] += 1
        for i, r in enumerate(dec):
            ran = out[i] >= 0
            toks = out[i][ran].tolist()
            r.num_computed += len(toks)
            self.stats["decode_tokens"] += len(toks)
            if bad[i]:
                self._retire(r, error=NumericalError(
                    f"the model produced NaN/inf logits (new token {len(r.outputs) + len(toks)}); check the "
                    "weights, or use float32 if a low-precision dtype overflowed"))
                continue
            self._register_full_blocks(r)
            self._accept(r, toks, None if lps is None else list(zip(*(a[i][ran] for a in lps))))


def _logprob_fields(n_top: int | None, lp: list) -> dict:
    """RequestOutput / TokenChunk log-probability fields from a request's (logprob, ids, top) list."""
    if n_top is None:
        return {}
    return {"logprobs": np.asarray([x[0] for x in lp], np.float32),
            "top_token_ids": np.asarray([x[1] for x in lp], np.int32).reshape(len(lp), n_top),
            "top_logprobs": np.asarray([x[2] for x in lp], np.float32).reshape(len(lp), n_top)}


# Neutral sampling values of an idle slot, in SamplingParams order.
_NEUTRAL = (np.float32(0.0), np.int32(0), np.float32(1.0), np.float32(0.0), np.float32(1.0), np.float32(0.0),
            np.float32(0.0))
