"""Static-batch generation: `model.generate`, `model.stream` and `ChatSession` over the static
preallocated KV cache, driving the shared jitted steps (`qvl_jax.engine.steps`).

A batch is laid out left-padded to a length bucket (`Generator.request`). Prefill writes it into the
cache at its current end and chooses the first new token from the last prompt position's logits;
the last prompt token is never fed twice. Decode then runs the steps' `lax.while_loop` while some
row goes on, the token budget lasts, and the cache end stays inside the attention window: the host
re-enters with the next window bucket, so attention only reads the filled part of the cache and
each bucket compiles once. `stream` runs the same loop one step per call.

`ChatSession` keeps the cache between turns: a follow-up prompt that extends the cached tokens (same
token ids, same images) prefills only its new tokens.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qvl_jax.config import Qwen3VLConfig
from qvl_jax.engine import cache as kv_cache
from qvl_jax.engine import sampling, speculative, speculative_runs, steps, structured
from qvl_jax.engine.sampling import SamplingParams
from qvl_jax.errors import InputError, NumericalError, ResourceError, device_free_bytes, device_memory_errors
from qvl_jax.modeling.inputs import bucket_length, compact_left, prepare_inputs
from qvl_jax.modeling.layout import prepare_prompt
from qvl_jax.modeling.model import vision_tower
from qvl_jax import sharding

MIN_READ = 64  # smallest attention window bucket during decode


@dataclasses.dataclass
class GenerateOutput:
    tokens: np.ndarray  # [b, n] int32 new tokens; stop token included, pad id after it
    lengths: np.ndarray  # [b] number of new tokens of each row (stop token included)
    logprobs: np.ndarray | None = None  # [b, n] float32 (return_logprobs=True)
    logits: np.ndarray | None = None  # [b, n, vocab] float32 raw logits (return_logits=True)
    prompt_tokens: int = 0  # prompt length (after padding removal) of the longest row
    reused_tokens: int = 0  # tokens taken from a chat session's cache instead of prefilled
    prefill_s: float = 0.0
    decode_s: float = 0.0
    # With speculative_config: per row, the proposals verified and those accepted; else None.
    proposed_tokens: np.ndarray | None = None
    accepted_tokens: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked generation request: the prompt chunk to prefill."""

    ids: np.ndarray  # [b, t] left-padded (or one row, right-padded to the bucket)
    positions: np.ndarray  # [3, b, t]
    valid: np.ndarray  # [b, t] bool
    last_idx: np.ndarray  # [b]
    delta: np.ndarray  # [b] rope_delta
    vision: object  # VisionInputs or None
    feat_index: np.ndarray | None  # [b, t]
    seen_ids: np.ndarray  # [b, any] token ids whose presence counts for the repetition penalty (-1 padded)
    prompt_len: int  # longest real prompt


@dataclasses.dataclass(frozen=True)
class Controls:
    """A request's checked generation settings, as the steps take them."""

    sampling: SamplingParams
    flags: sampling.SamplingFlags
    stop_ids: np.ndarray  # [n] int32, -1 = unused slot (at least 8: the compiled loop does not depend on how many)
    pad_id: int
    max_new: int
    grammar: structured.Grammar | None = None  # sampling.structured, compiled for the model's tokenizer


def check_max_new(max_new_tokens) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    return int(max_new_tokens)


def controls(model, batch: int, max_new_tokens, kw: dict, return_logprobs: bool = False) -> Controls:
    """Checks a call's generation arguments once: max_new_tokens, sampling_params or the
    SamplingParams fields as keywords, pad_token_id. Stop ids default to the checkpoint's EOS ids
    (none with ignore_eos)."""
    max_new = check_max_new(max_new_tokens)
    kw = dict(kw)
    pad = kw.pop("pad_token_id", None)
    sp = kw.pop("sampling_params", None)
    if sp is None:
        sp = SamplingParams.from_kwargs(kw)
    elif kw:
        raise InputError(f"give sampling_params or sampling keywords, not both (got {', '.join(sorted(kw))})")
    elif not isinstance(sp, SamplingParams):
        raise InputError(f"sampling_params must be a qvl_jax.SamplingParams, got {type(sp).__name__}")
    if return_logprobs and sp.logprobs is None:
        sp = dataclasses.replace(sp, logprobs=0)
    sp.rows(batch)  # the per-row lengths
    defaults = model.generation_defaults
    vocab = model.config.text.vocab_size
    ids = sp.stop_token_ids
    if ids is None:
        ids = () if sp.ignore_eos else sampling.token_ids("eos_token_id", defaults.get("eos_token_id") or [])
    stop = np.full(max(8, len(ids)), -1, np.int32)
    stop[:len(ids)] = ids
    if ((stop >= vocab) | (stop < -1)).any():
        raise InputError(f"stop_token_ids must lie in [0, {vocab}), got {stop[stop >= 0].tolist()}")
    if pad is None:
        pad = defaults.get("pad_token_id", 0)
        if pad is None:
            pad = int(stop[0]) if stop[0] >= 0 else 0
    if not 0 <= sampling.token_id("pad_token_id", pad) < vocab:
        raise InputError(f"pad_token_id must lie in [0, {vocab}), got {pad}")
    grammar = None
    if sp.structured is not None:
        if model.path is None:
            raise InputError("structured outputs need the model's tokenizer: load the model from a directory")
        grammar = structured.for_request(structured.tokenizer_json(model.path), vocab, sp.structured, stop)
    return Controls(sp, sp.flags, stop, int(pad), max_new, grammar)


def rows_for(ctl: Controls, batch: int, *, seq_len, lo, delta, limit, slot=None, n_out=None,
             allow=None) -> steps.Rows:
    """The steps' per-row arrays for `batch` rows of one call's settings (allow: the packed masks of
    constrained rows)."""
    zeros = np.zeros(batch, np.int32)
    keys = steps.row_keys(ctl.sampling.seed, batch)
    return steps.Rows(
        slot=np.arange(batch, dtype=np.int32) if slot is None else slot,
        seq_len=np.broadcast_to(np.asarray(seq_len, np.int32), (batch,)),
        lo=np.broadcast_to(np.asarray(lo, np.int32), (batch,)), delta=np.asarray(delta, np.int32) - lo,
        n_out=zeros if n_out is None else n_out, max_new=np.full(batch, ctl.max_new, np.int32),
        limit=np.broadcast_to(np.asarray(limit, np.int32), (batch,)), keys=keys,
        stop_ids=np.broadcast_to(ctl.stop_ids, (batch, len(ctl.stop_ids))),
        sampling=sampling.SamplingArrays(*ctl.sampling.rows(batch)), allow=allow)


class Generator:
    """Runs static batches against one model; holds nothing but the model."""

    def __init__(self, model):
        self.model = model
        self.cfg: Qwen3VLConfig = model.config
        self.mesh = getattr(model, "mesh", None)  # static argument of the jitted steps
        # Where host arrays the steps reuse are put: replicated over the mesh, or the default device.
        self._where = None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

    # -- checks ------------------------------------------------------------------------------------
    def _check_capacity(self, prompt_len: int, max_new: int, batch: int, cache_len: int):
        limit = self.cfg.text.max_position_embeddings
        if prompt_len + max_new > limit:
            raise InputError(f"prompt of {prompt_len} tokens + max_new_tokens={max_new} = {prompt_len + max_new} "
                             f"exceeds the model's context of {limit} tokens")
        need = kv_cache.cache_bytes(self.cfg.text, batch, cache_len, self.model.dtype)
        if self.mesh is not None:  # each device holds one block of the sharded cache
            shape = (self.cfg.text.num_hidden_layers, batch, cache_len, self.cfg.text.num_key_value_heads,
                     self.cfg.text.head_dim)
            need = need * int(np.prod(kv_cache.cache_sharding(self.cfg.text, self.mesh, batch).k.shard_shape(shape))) \
                // int(np.prod(shape))
        free = device_free_bytes()
        if free is not None and need > free:
            raise ResourceError(f"the KV cache for batch {batch} x {cache_len} positions needs "
                                f"{need / 2**30:.2f} GiB but the device has {free / 2**30:.2f} GiB free: "
                                "use a smaller batch or max_new_tokens")

    # -- requests -----------------------------------------------------------------------------------
    def request(self, inputs: dict) -> Request:
        """Checks a batch and lays it out left-padded to a length bucket."""
        ids = inputs.get("input_ids")
        if ids is None:
            raise InputError("generate needs input_ids")
        inp = compact_left(prepare_inputs(self.cfg, **inputs))  # checked once, then laid out left-padded
        ids, mask = inp.input_ids, inp.mask
        b, t = ids.shape
        tb = bucket_length(t)
        pad = ((0, 0), (tb - t, 0))
        seen = np.where(mask > 0, ids, -1).astype(np.int32)
        return Request(
            ids=np.pad(inp.input_ids, pad), positions=np.pad(inp.positions, ((0, 0), *pad)),
            valid=np.pad(inp.mask, pad) > 0, last_idx=np.full(b, tb - 1, np.int32), delta=inp.rope_delta,
            vision=inp.vision, feat_index=None if inp.feat_index is None else np.pad(inp.feat_index, pad,
                                                                                      constant_values=-1),
            seen_ids=seen, prompt_len=t)

    def new_cache(self, batch: int, max_len: int) -> kv_cache.StaticCache:
        return kv_cache.allocate(self.cfg.text, batch, max_len, self.model.dtype, self.mesh)

    def history(self, ctl: Controls, seen_ids: np.ndarray):
        """The penalty history of a batch (None, None without penalties): seen = its prompt tokens."""
        flags = ctl.flags
        if not flags.penalties:
            return None, None
        b, vocab = seen_ids.shape[0], self.cfg.text.vocab_size
        seen = jnp.zeros((b, vocab), bool, device=self._where) if flags.repetition else None
        counts = jnp.zeros((b, vocab), jnp.int32, device=self._where) if flags.frequency_presence else None
        hist = np.full((b, bucket_length(seen_ids.shape[1], 16)), -1, np.int32)
        hist[:, :seen_ids.shape[1]] = seen_ids
        return steps.set_history(seen, counts, np.arange(b, dtype=np.int32), hist,
                                 np.full(b, hist.shape[1], np.int32))

    # -- running ------------------------------------------------------------------------------------
    def start(self, req: Request, cache: kv_cache.StaticCache, offset: int, ctl: Controls, history,
              want_logits: bool) -> "_Run":
        """Prefills req's chunk at cache index `offset`: the run after its first token."""
        b, t = req.ids.shape
        window = min(cache.max_len, bucket_length(offset + t, MIN_READ))
        # A fresh cache starts each row at its first real token (left padding); a continued one at 0.
        lo = np.argmax(req.valid, axis=1).astype(np.int32) if offset == 0 else np.zeros(b, np.int32)
        # Structured outputs: each row's grammar state on the host, its first mask into the prefill.
        matchers = None if ctl.grammar is None else [ctl.grammar.matcher() for _ in range(b)]
        allow = None if matchers is None else structured.masks(matchers, b, self.model.config.text.vocab_size)
        rows = rows_for(ctl, b, seq_len=offset, lo=lo, delta=req.delta, limit=window, allow=allow)
        vision = None
        if req.vision is not None:
            feats, deepstack = vision_tower(*self.model.split, req.vision)
            vision = (feats, deepstack, jax.device_put(req.feat_index))
        seen, counts = history
        # Prefill hands the rows back on the device: the decode calls reuse them, changing only what
        # each loop hands back.
        cache, seen, counts, out, rows = steps.prefill(
            *self.model.split, ctl.flags, window, want_logits, cache, seen, counts, req.ids, req.positions, req.valid,
            np.full(b, offset, np.int32), req.last_idx, vision, rows, np.ones(b, bool), mesh=self.mesh)
        return _Run(self, ctl, want_logits, cache, seen, counts, rows, out, matchers)


class _Run:
    """A static batch being decoded: the device state between loop calls and the tokens so far."""

    def __init__(self, gen: Generator, ctl: Controls, want_logits: bool, cache, seen, counts, rows: steps.Rows,
                 first: steps.Tokens, matchers: list | None = None):
        self.gen, self.ctl, self.want_logits = gen, ctl, want_logits
        self.matchers = matchers  # structured outputs: one grammar state per row (host)
        self.cache, self.seen, self.counts = cache, seen, counts
        self.rows = rows
        self.last = first
        self.parts = [first]  # Tokens of each call, on the device until `collect`
        self._limits: dict[int, jax.Array] = {}  # window -> [b] limit on the device

    def step(self, n_steps: int) -> steps.Tokens | None:
        """One decode loop of up to n_steps steps (None when every row is finished). Constrained
        rows run one step a call: the next mask needs the token just chosen."""
        last = self.last
        seq_len, active, n_out, toks = sharding.to_host((last.seq_len, last.active, last.n_out, last.tokens))
        rows = self.rows
        if self.matchers is not None:
            for i, m in enumerate(self.matchers):
                m.consume(toks[i][toks[i] >= 0])
            if not active.any() or int(n_out.max()) >= self.ctl.max_new:
                return None
            allow = structured.masks([m if a else None for m, a in zip(self.matchers, active)], len(active),
                                     self.gen.model.config.text.vocab_size)
            rows, n_steps = rows._replace(allow=allow), 1
        if not active.any() or int(n_out.max()) >= self.ctl.max_new:
            return None
        window = min(self.cache.max_len, bucket_length(int(seq_len.max()) + 1, MIN_READ))
        if window not in self._limits:
            self._limits[window] = jax.device_put(np.full(len(seq_len), window, np.int32), self.gen._where)
        # The loop's own outputs go back in as they are (no copy through the host).
        rows = rows._replace(seq_len=last.seq_len, n_out=last.n_out, limit=self._limits[window])
        self.cache, self.seen, self.counts, out = steps.decode(
            *self.gen.model.split, self.ctl.flags, window, n_steps, self.want_logits, self.cache, self.seen,
            self.counts, last.last_tok, last.active, rows, mesh=self.gen.mesh)
        self.last = out
        self.parts.append(out)
        return out

    def run(self) -> None:
        n_steps = bucket_length(self.ctl.max_new, 16)
        while self.step(n_steps) is not None:
            pass

    def collect(self, return_logprobs: bool, return_logits: bool, **extra) -> GenerateOutput:
        """The tokens so far, as `model.generate` returns them (NumericalError for a bad row)."""
        fields = ("tokens", "bad") + (("logprobs",) if return_logprobs else ()) + (("logits",) if return_logits else ())
        parts = [dict(zip(fields, p)) for p in sharding.to_host([[getattr(p, f) for f in fields] for p in self.parts])]
        bad = np.max([p["bad"] for p in parts], axis=0)
        if (bad >= 0).any():
            row = int(np.flatnonzero(bad >= 0)[0])
            raise NumericalError(f"the model produced NaN/inf logits (batch row {row}, new token {int(bad[row])}); "
                                 "check the weights, or use float32 if a low-precision dtype overflowed")
        ran = [p["tokens"].shape[1] if i == 0 else int((p["tokens"] >= 0).any(0).sum()) for i, p in enumerate(parts)]
        tokens = np.concatenate([p["tokens"][:, :n] for p, n in zip(parts, ran)], axis=1).astype(np.int32)
        tokens = np.where(tokens >= 0, tokens, self.ctl.pad_id).astype(np.int32)
        stop = self.ctl.stop_ids
        is_stop = np.isin(tokens, stop[stop >= 0])
        n = tokens.shape[1]
        lengths = np.where(is_stop.any(1), is_stop.argmax(1) + 1, n).astype(np.int32)
        # A row that stopped keeps the pad id after its stop token.
        tokens = np.where(np.arange(n)[None] < lengths[:, None], tokens, self.ctl.pad_id).astype(np.int32)
        out = GenerateOutput(tokens=tokens, lengths=lengths, **extra)
        if return_logprobs:
            lp = np.concatenate([p["logprobs"][:, :k] for p, k in zip(parts, ran)], axis=1).astype(np.float32)
            out.logprobs = np.where(np.arange(n)[None] < lengths[:, None], lp, 0.0).astype(np.float32)
        if return_logits:
            out.logits = np.concatenate([p["logits"][:, :k] for p, k in zip(parts, ran)], axis=1).astype(np.float32)
        return out


def _begin(model, max_new_tokens, return_logits, kwargs, return_logprobs=False):
    """Checks a request, allocates its cache and runs the prefill: (generator, request, run, prefill
    seconds); the run is a `speculative_runs.SpecRun` when kwargs hold a speculative_config."""
    inputs = {k: kwargs.pop(k) for k in list(kwargs) if k in INPUT_NAMES}
    spec = speculative.SpeculativeConfig.of(kwargs.pop("speculative_config", None))
    gen = Generator(model)
    req = gen.request(inputs)
    b, t = req.ids.shape
    ctl = controls(model, b, max_new_tokens, kwargs, return_logprobs)
    if spec is not None:
        refused = speculative.unsupported(ctl.flags) or ("return_logits" if return_logits else None)
        if refused:
            raise InputError(f"speculative decoding does not combine with {refused} yet")
    cache_len = bucket_length(t + ctl.max_new, MIN_READ)
    gen._check_capacity(req.prompt_len, ctl.max_new, b, cache_len)
    t0 = time.perf_counter()
    run = gen.start(req, gen.new_cache(b, cache_len), 0, ctl, gen.history(ctl, req.seen_ids), return_logits)
    jax.block_until_ready(run.last.tokens)
    if spec is not None:
        run = speculative_runs.SpecRun(run, spec, req)
    return gen, req, run, time.perf_counter() - t0


INPUT_NAMES = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
               "video_grid_thw", "mm_token_type_ids")


def generate(model, max_new_tokens: int = 64, return_logprobs=False, return_logits=False, **kwargs) -> GenerateOutput:
    """See `Model.generate`."""
    gen, req, run, prefill_s = _begin(model, max_new_tokens, return_logits, kwargs, return_logprobs)
    t1 = time.perf_counter()
    if not isinstance(run, _Run):  # speculative
        run.run_all()
        return run.collect(prompt_tokens=req.prompt_len, prefill_s=prefill_s, decode_s=time.perf_counter() - t1)
    run.run()
    jax.block_until_ready(run.last.tokens)
    return run.collect(return_logprobs, return_logits, prompt_tokens=req.prompt_len, prefill_s=prefill_s,
                       decode_s=time.perf_counter() - t1)


def stream(model, max_new_tokens: int = 64, **kwargs) -> Iterator[np.ndarray]:
    """See `Model.stream`: yields np.int32 [b] (the next token of each row, pad once a row stopped)."""
    gen, _, run, _ = _begin(model, max_new_tokens, False, kwargs)
    if not isinstance(run, _Run):  # speculative
        yield from run.stream()
        return
    yield np.asarray(sharding.to_host(run.last.tokens[:, 0]), np.int32)
    while (out := run.step(1)) is not None:
        tok = np.asarray(sharding.to_host(out.tokens[:, 0]), np.int32)
        yield np.where(tok >= 0, tok, run.ctl.pad_id).astype(np.int32)  # -1: the row has stopped


class ChatSession:
    """Multi-turn generation that keeps the KV cache between turns (one conversation, batch 1).

    Each call takes the whole conversation so far (as a processor renders it, e.g. with the previous
    answer and a new user turn appended). When it extends the tokens already in the cache, with the
    same images, only the new tokens are prefilled; otherwise the session starts over. Either way the
    result equals running the whole conversation from scratch.
    """

    def __init__(self, model, max_cache_len: int | None = None):
        self.model = model
        self._gen = Generator(model)
        self._max_cache_len = max_cache_len
        self.reset()

    def reset(self):
        self._cache: kv_cache.StaticCache | None = None
        self._cached_ids = np.zeros(0, np.int32)  # token ids whose keys/values are in the cache
        self._digests: tuple[str, ...] = ()  # the cached tokens' images and videos, in prompt order

    @property
    def cached_tokens(self) -> int:
        return len(self._cached_ids)

    def generate(self, max_new_tokens: int = 64, return_logprobs=False, return_logits=False,
                 **kwargs) -> GenerateOutput:
        """As `model.generate` for the whole conversation so far (a batch of one)."""
        with device_memory_errors("chat generate"):
            return self._generate(max_new_tokens, return_logprobs, return_logits, **kwargs)

    def _generate(self, max_new_tokens, return_logprobs, return_logits, **kwargs) -> GenerateOutput:
        inputs = {k: kwargs.pop(k) for k in list(kwargs) if k in INPUT_NAMES}
        layout = prepare_prompt(self.model.config, **inputs,
                                batch_message="a chat session holds one conversation; got a batch of {n}")
        ctl = controls(self.model, 1, max_new_tokens, kwargs, return_logprobs)
        max_new_tokens = ctl.max_new
        ids, total = layout.ids, len(layout)

        # Reuse needs the cached tokens to be a proper prefix, with the same images / videos behind
        # them, and no image or video cut by the prefix's end.
        n = len(self._cached_ids)
        in_prefix = layout.items_ending_by(n)
        if not (self._cache is not None and 0 < n < total and not layout.splits_item(n)
                and np.array_equal(ids[:n], self._cached_ids)
                and tuple(m.digest for m in in_prefix) == self._digests):
            self.reset()
            n = 0
        new_media = layout.items_ending_after(n)

        # The chunk to prefill: the new tokens, right-padded to a bucket, at the cache end.
        chunk = ids[n:]
        tb = bucket_length(len(chunk))
        pad = tb - len(chunk)
        vision = layout.vision_inputs(new_media)
        req = Request(
            ids=np.pad(chunk, (0, pad))[None], positions=np.pad(layout.positions[:, n:], ((0, 0), (0, pad)))[:, None],
            valid=(np.arange(tb) < len(chunk))[None], last_idx=np.array([len(chunk) - 1], np.int32),
            delta=np.array([layout.rope_delta], np.int32), vision=vision,
            feat_index=None if vision is None else layout.chunk_feat_index(new_media, n, total, tb)[None],
            seen_ids=ids[None].astype(np.int32), prompt_len=total)
        needed = n + tb + max_new_tokens
        cap = max(self._max_cache_len or 0, needed)
        cache_len = bucket_length(cap, MIN_READ)
        self._gen._check_capacity(total, max_new_tokens, 1, cache_len)
        cache, self._cache = self._cache, None  # donated to the steps; kept again only if they succeed
        if cache is None:
            cache = self._gen.new_cache(1, cache_len)
        elif cache.max_len < needed:
            cache = kv_cache.grow(cache, cache_len)
        t0 = time.perf_counter()
        run = self._gen.start(req, cache, n, ctl, self._gen.history(ctl, req.seen_ids), return_logits)
        jax.block_until_ready(run.last.tokens)
        t1 = time.perf_counter()
        run.run()
        jax.block_until_ready(run.last.tokens)
        out = run.collect(return_logprobs, return_logits, prompt_tokens=total, reused_tokens=n, prefill_s=t1 - t0,
                          decode_s=time.perf_counter() - t1)
        # The cache now holds the conversation and every new token but the last (never fed).
        self._cache = run.cache
        fed = out.tokens[0, : out.lengths[0] - 1]
        self._cached_ids = np.concatenate([ids, fed]).astype(np.int32)
        self._digests = layout.digests
        return out
