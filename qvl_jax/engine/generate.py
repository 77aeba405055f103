"""Generation: jitted prefill, then a jitted `lax.while_loop` decode over the static KV cache.

Prefill writes a (bucket-padded) chunk of prompt tokens into the cache at its current end and samples
the first new token from the last prompt position's logits; the last prompt token is never fed twice.
Each decode step feeds the previous token at the cache end, with rotary position (index - start) +
rope_delta, and samples the next one inside the loop. The loop runs while some row is unfinished, the
token budget lasts, and the cache end stays inside the static `read_len` that attention reads: the
host re-enters with the next length bucket, so attention only reads the filled part of the cache and
each bucket compiles once. `stream` drives the same step function from Python, one token at a time.

`ChatSession` keeps the cache between turns: a follow-up prompt that extends the cached tokens (same
token ids, same images) prefills only its new tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qvl_jax import sharding
from qvl_jax.engine import cache as kv_cache, sampling
from qvl_jax.config import Qwen3VLConfig
from qvl_jax.errors import InputError, NumericalError, ResourceError, device_free_bytes, device_memory_errors
from qvl_jax.modeling.inputs import bucket_length, prepare_inputs, vision_bucket
from qvl_jax.modeling.model import Structure, vision_tower

MIN_READ = 64  # smallest attention window bucket during decode


class DecodeState(NamedTuple):
    step: jax.Array  # [] int32: tokens produced so far
    max_new: jax.Array  # [] int32
    tokens: jax.Array  # [b, n] int32 (pad after a row's stop token)
    logprobs: jax.Array  # [b, n] float32: log-probability of each chosen token under the model
    logits: jax.Array | None  # [b, n, vocab] raw logits of each step (return_logits=True only)
    done: jax.Array  # [b] bool
    bad_step: jax.Array  # [b] int32: first step whose logits were not finite, -1 if none
    cache: kv_cache.KVCache
    key: jax.Array  # PRNG key
    seen: jax.Array | None  # [b, vocab] bool: in prompt or output (repetition penalty only)
    counts: jax.Array | None  # [b, vocab] int32: occurrences in the output (frequency/presence only)
    embed: jax.Array | None = None  # [b, 1, d] input embedding of the last chosen token (blocked greedy only)


class Controls(NamedTuple):
    """Per-call constants of the loop (arrays, so new values do not recompile)."""

    sampling: sampling.SamplingParams
    stop_ids: jax.Array  # [n_stop] int32 (-1 = unused slot)
    pad_id: jax.Array  # [] int32


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


# Under a mesh, greedy decoding chooses its token with `_greedy_by_blocks`, and also hands the next
# step its input embedding while the all-gather that carries it stays below this size; past it (large
# batches) the next step looks the token up in the vocab-split table instead: one all-reduce of
# [b, d] more per step, but fewer bytes than gathering every block's candidate row.
CARRY_EMBED_MAX_BYTES = 4 << 20


def _blocked(flags: sampling.SamplingFlags, mesh) -> bool:
    """Whether the step chooses its token with `_greedy_by_blocks` (greedy, under a mesh)."""
    return mesh is not None and not flags.sample


def _carry_embed(cfg: Qwen3VLConfig, flags: sampling.SamplingFlags, mesh, batch: int) -> bool:
    """Whether `_greedy_by_blocks` also gathers each block's candidate embedding row (`state.embed`):
    only where the vocabulary is split (else the lookup is local anyway) and the gather is small."""
    n = sharding.vocab_blocks(cfg.text.vocab_size, mesh)
    return (_blocked(flags, mesh) and n > 1
            and batch * n * (cfg.text.hidden_size + 6) * 4 <= CARRY_EMBED_MAX_BYTES)


def _pad_embed(m, ctl: Controls, carry: bool) -> jax.Array | None:
    """[1, 1, d] embedding of the pad token, what finished rows are fed when the steps carry their
    input embeddings (carry); looked up once per jitted call, outside the loop (a lookup in the
    vocab-split table costs an all-reduce). Prefill decides whether to carry (`_carry_embed`); the
    decode functions follow the state they are given (`state.embed` set or None)."""
    return m.embed(jnp.reshape(ctl.pad_id, (1, 1))) if carry else None


def _greedy_by_blocks(logits: jax.Array, table: jax.Array | None, sp: sampling.SamplingParams,
                      flags: sampling.SamplingFlags, seen: jax.Array | None, counts: jax.Array | None,
                      mesh) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Greedy choice over vocab-sharded logits [b, vocab] with one collective: (tokens [b], their
    log-probabilities [b] (zeros unless flags.logprobs), finite [b], and given the embedding table
    [vocab, d], the tokens' input embeddings [b, 1, d] for the next step).

    Left to itself XLA spends four all-reduces per step here, one after another: the finite check,
    the max, the first index of the max, and the next step's lookup in the vocab-split embedding
    table (a masked local gather, then a sum); log-probabilities add three more. Here each
    vocabulary block (as the rules split the lm_head output, and the embedding rows alike) reduces
    locally to its candidate: (max, first index of the max, all finite), with log-probabilities its
    (max logit, sum of exp(logit - max), logit of the candidate), and with the table the candidate's
    own embedding row. The [b, blocks, fields] candidates are gathered everywhere at once, and every
    device picks the first block holding the overall max: the same token as `sampling.first_argmax`
    over the whole row, and its embedding row exactly. Tokens come out whole on every device, so
    `done` is too, and the loop condition needs no collective (a batch split over "data" would
    otherwise cost an all-reduce there)."""
    b, vocab = logits.shape
    n = sharding.vocab_blocks(vocab, mesh)
    if vocab > 2 ** 24:  # token ids travel as float32 in the gathered candidates
        raise ValueError(f"vocabulary of {vocab} entries: too large for the blocked greedy choice")
    blocks = ("batch", "vocab", None)
    processed = sampling.apply_penalties(logits, sp, flags, seen, counts)  # elementwise: stays split
    processed = sharding.constrain(processed.reshape(b, n, vocab // n), mesh, blocks)
    raw = sharding.constrain(logits.reshape(b, n, vocab // n), mesh, blocks)
    local = sampling.first_argmax(processed)  # [b, n]: index inside each block
    index = local + jnp.arange(n, dtype=jnp.int32) * (vocab // n)
    fields = [jnp.max(processed, axis=-1), index.astype(jnp.float32),
              jnp.all(jnp.isfinite(raw), axis=-1).astype(jnp.float32)]
    if flags.logprobs:
        top = jnp.max(raw, axis=-1, keepdims=True)
        fields += [top[..., 0], jnp.sum(jnp.exp(raw - top), axis=-1),
                   jnp.take_along_axis(raw, local[..., None], axis=-1)[..., 0]]
    cand = jnp.stack(fields, axis=-1)
    if table is not None:  # each block's candidate row, from the device's own rows
        rows = sharding.constrain(table.reshape(n, vocab // n, -1), mesh, ("vocab", None, None))
        rows = jax.vmap(lambda block, i: block[i], in_axes=(0, 1), out_axes=1)(rows, local)
        cand = jnp.concatenate([cand, rows.astype(jnp.float32)], axis=-1)
    cand = sharding.replicate(cand, mesh, blocks)  # the one collective: an all-gather
    pick = jnp.take_along_axis(cand, sampling.first_argmax(cand[..., 0])[:, None, None], axis=1)[:, 0]
    tok = pick[:, 1].astype(jnp.int32)
    finite = jnp.all(cand[..., 2] > 0, axis=1)
    lp = jnp.zeros((b,), jnp.float32)
    if flags.logprobs:  # log_softmax at the token, its sum of exponentials assembled from the blocks
        top = jnp.max(cand[..., 3], axis=1)
        lp = (pick[:, 5] - top) - jnp.log(jnp.sum(cand[..., 4] * jnp.exp(cand[..., 3] - top[:, None]), axis=1))
    x = None if table is None else pick[:, None, len(fields):].astype(table.dtype)
    # Pinned whole, or XLA may work on batch shards from here and gather the results again.
    whole = [None if a is None else sharding.constrain(a, mesh, (None,) * a.ndim) for a in (tok, lp, finite, x)]
    return tuple(whole)


def _record(state: DecodeState, ctl: Controls, flags: sampling.SamplingFlags, logits: jax.Array,
            m, mesh=None, pad_embed: jax.Array | None = None) -> DecodeState:
    """Chooses the token of step `state.step` from `logits` and records it.

    Under a mesh, greedy decoding goes through `_greedy_by_blocks`; given pad_embed (`_pad_embed`,
    what finished rows are fed) it also sets `state.embed`, the next step's input embedding."""
    step = state.step
    x_next = None
    if _blocked(flags, mesh):
        table = None if pad_embed is None else m.model.language_model.embed_tokens.weight[...]
        tok, lp, finite, x_next = _greedy_by_blocks(logits, table, ctl.sampling, flags, state.seen, state.counts,
                                                    mesh)
    else:
        # A row whose logits are not finite is stopped and reported, never sampled from.
        finite = jnp.all(jnp.isfinite(logits), axis=-1)
        tok, lp = sampling.choose(jax.random.fold_in(state.key, step), jnp.where(finite[:, None], logits, 0.0),
                                  ctl.sampling, flags, state.seen, state.counts)
    bad_step = jnp.where((state.bad_step < 0) & ~finite & ~state.done, step, state.bad_step)
    live = ~state.done & finite
    # Under a mesh the per-row bookkeeping ([b]: cheap) is kept whole on every device, down to
    # `done`: the loop condition's jnp.all then needs no all-reduce over "data".
    live = sharding.constrain(live, mesh, (None,))
    tok = sharding.constrain(jnp.where(live, tok, ctl.pad_id), mesh, (None,))
    if x_next is not None:
        x_next = jnp.where(live[:, None, None], x_next, pad_embed)
    b = tok.shape[0]
    seen, counts = state.seen, state.counts
    if seen is not None:
        seen = seen.at[jnp.arange(b), tok].max(live)  # an OR; no read of seen (a vocab-split gather)
    if counts is not None:
        counts = counts.at[jnp.arange(b), tok].add(live.astype(jnp.int32))
    out_logits = state.logits
    if out_logits is not None:
        out_logits = jax.lax.dynamic_update_index_in_dim(out_logits, logits.astype(jnp.float32), step, axis=1)
    done = sharding.constrain(state.done | jnp.isin(tok, ctl.stop_ids) | ~finite, mesh, (None,))
    return state._replace(
        step=step + 1,
        tokens=jax.lax.dynamic_update_index_in_dim(state.tokens, tok, step, axis=1),
        logprobs=jax.lax.dynamic_update_index_in_dim(state.logprobs, jnp.where(live, lp, 0.0), step, axis=1),
        logits=out_logits, done=done, bad_step=bad_step, seen=seen, counts=counts, embed=x_next)


@functools.partial(jax.jit, static_argnames=("structure", "flags", "read_len", "n_out", "want_logits", "mesh"),
                   donate_argnames=("cache",))
def prefill(structure: Structure, leaves: list, flags: sampling.SamplingFlags, read_len: int, n_out: int,
            want_logits: bool, ids: jax.Array, positions: jax.Array, valid: jax.Array, last_idx: jax.Array,
            vision, cache: kv_cache.KVCache, delta: jax.Array, ctl: Controls, max_new: jax.Array, key: jax.Array,
            seen_ids: jax.Array | None, mesh=None) -> DecodeState:
    """Writes the chunk ids [b, t] at cache.end, then chooses the first new token.

    valid [b, t] marks real tokens; last_idx [b] is each row's last real token in the chunk (all rows
    end together: left padding, or a single row). (structure, leaves): the model, split."""
    m = structure.merge(leaves)
    cfg = m.config
    b, t = ids.shape
    offset = cache.end
    x, deepstack = m.embed_inputs(ids, vision)
    j = jnp.arange(read_len)
    in_chunk = (j >= offset) & (j < offset + t)
    chunk_valid = jnp.take_along_axis(valid, jnp.clip(j - offset, 0, t - 1)[None].repeat(b, 0), axis=1)
    key_ok = (j[None] >= cache.start[:, None]) & ((j[None] < offset) | (in_chunk[None] & chunk_valid))
    causal = j[None, :] <= (offset + jnp.arange(t))[:, None]  # [t, read_len]
    mask = key_ok[:, None, :] & causal[None]
    h, (k, v) = m.model.language_model(x, positions, mask, deepstack, (cache.k, cache.v), offset, read_len)
    last = jnp.take_along_axis(h, last_idx[:, None, None], axis=1)
    logits = m.lm_logits(last)[:, 0].astype(jnp.float32)
    # A fresh cache starts each row at its first real token; a continued one keeps its starts.
    start = jnp.where(offset == 0, jnp.argmax(valid, axis=1).astype(jnp.int32), cache.start)
    new_cache = cache._replace(k=k, v=v, start=start, end=offset + jnp.max(last_idx) + 1, delta=delta)
    vocab = cfg.text.vocab_size
    seen = counts = None
    if flags.repetition:
        seen = jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], seen_ids].max(seen_ids >= 0)
        seen = seen.at[:, 0].set(seen[:, 0] | jnp.any(seen_ids == 0, axis=1))
    if flags.frequency_presence:
        counts = jnp.zeros((b, vocab), jnp.int32)
    out = DecodeState(
        step=jnp.zeros((), jnp.int32), max_new=max_new,
        tokens=jnp.zeros((b, n_out), jnp.int32), logprobs=jnp.zeros((b, n_out), jnp.float32),
        logits=jnp.zeros((b, n_out, vocab), jnp.float32) if want_logits else None,
        done=jnp.zeros((b,), bool), bad_step=jnp.full((b,), -1, jnp.int32), cache=new_cache, key=key,
        seen=seen, counts=counts)
    pad = _pad_embed(m, ctl, _carry_embed(cfg, flags, mesh, b))
    return _record(out, ctl, flags, logits, m, mesh, pad)


def _decode_step(m, flags: sampling.SamplingFlags, read_len: int,
                 state: DecodeState, ctl: Controls, mesh=None, pad_embed: jax.Array | None = None) -> DecodeState:
    """Feeds the last chosen token at the cache end and chooses the next one."""
    cache = state.cache
    tok = jax.lax.dynamic_index_in_dim(state.tokens, state.step - 1, axis=1, keepdims=False)
    pos = cache.end - cache.start + cache.delta  # [b]
    positions = jnp.broadcast_to(pos[None, :, None], (3, tok.shape[0], 1))
    j = jnp.arange(read_len)
    mask = ((j[None] >= cache.start[:, None]) & (j[None] <= cache.end))[:, None, :]
    x = m.embed(tok[:, None]) if state.embed is None else state.embed
    h, (k, v) = m.model.language_model(x, positions, mask, None, (cache.k, cache.v), cache.end, read_len)
    logits = m.lm_logits(h)[:, 0].astype(jnp.float32)
    state = state._replace(cache=cache._replace(k=k, v=v, end=cache.end + 1))
    return _record(state, ctl, flags, logits, m, mesh, pad_embed)


def _running(state: DecodeState, read_len: int) -> jax.Array:
    return (state.step < state.max_new) & ~jnp.all(state.done) & (state.cache.end < read_len)


@functools.partial(jax.jit, static_argnames=("structure", "flags", "read_len", "mesh"), donate_argnames=("state",))
def decode_loop(structure: Structure, leaves: list, flags: sampling.SamplingFlags, read_len: int,
                state: DecodeState, ctl: Controls, mesh=None) -> DecodeState:
    """Decodes until every row stopped, the budget is spent, or the cache end reaches read_len.

    mesh: the params' mesh (None on one device); it only pins a few layouts (`_greedy_by_blocks`)."""
    m = structure.merge(leaves)
    pad = _pad_embed(m, ctl, state.embed is not None)
    return jax.lax.while_loop(lambda s: _running(s, read_len),
                              lambda s: _decode_step(m, flags, read_len, s, ctl, mesh, pad), state)


@functools.partial(jax.jit, static_argnames=("structure", "flags", "read_len", "mesh"), donate_argnames=("state",))
def decode_one(structure: Structure, leaves: list, flags: sampling.SamplingFlags, read_len: int,
               state: DecodeState, ctl: Controls, mesh=None) -> DecodeState:
    """One decode step (the streaming path): the same step function as the loop body."""
    m = structure.merge(leaves)
    return _decode_step(m, flags, read_len, state, ctl, mesh, _pad_embed(m, ctl, state.embed is not None))


# ---------------------------------------------------------------------------------------------
# Host side


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked generation request: the prompt chunk to prefill and the loop's controls."""

    ids: np.ndarray  # [b, t] left-padded (or one row, right-padded to the bucket)
    positions: np.ndarray  # [3, b, t]
    valid: np.ndarray  # [b, t] bool
    last_idx: np.ndarray  # [b]
    delta: np.ndarray  # [b]
    vision: object  # VisionInputs or None
    feat_index: np.ndarray | None  # [b, t]
    seen_ids: np.ndarray | None  # [b, any] token ids whose presence counts for the repetition penalty
    prompt_len: int  # longest real prompt


def _compact_left(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Moves each row's real tokens to the right end (left padding), whatever padding came in."""
    lengths = mask.sum(1)
    t = int(lengths.max())
    out = np.zeros((len(ids), t), ids.dtype)
    new_mask = np.zeros((len(ids), t), np.int32)
    for r in range(len(ids)):
        out[r, t - lengths[r]:] = ids[r][mask[r] > 0]
        new_mask[r, t - lengths[r]:] = 1
    return out, new_mask


def _stop_ids(stop_token_ids, default) -> np.ndarray:
    ids = default if stop_token_ids is None else stop_token_ids
    ids = np.asarray(sampling.token_ids("stop_token_ids", ids) if ids is not None else [], dtype=np.int64)
    # A fixed-size slot array keeps the compiled loop independent of how many stop tokens there are.
    out = np.full(max(8, len(ids)), -1, np.int32)
    out[: len(ids)] = ids
    return out


class Generator:
    """Runs requests against one model; holds nothing but the model and its defaults."""

    def __init__(self, model):
        self.model = model
        self.cfg: Qwen3VLConfig = model.config
        self.mesh = getattr(model, "mesh", None)  # static argument of the jitted steps

    # -- checks ------------------------------------------------------------------------------------
    def _controls(self, batch, max_new_tokens, stop_token_ids, pad_token_id, kw, logprobs=False) -> tuple:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        gen = self.model.generation_defaults
        stop = _stop_ids(stop_token_ids, gen.get("eos_token_id"))
        vocab = self.cfg.text.vocab_size
        if ((stop >= vocab) | (stop < -1)).any():
            raise InputError(f"stop_token_ids must lie in [0, {vocab}), got {stop[stop >= 0].tolist()}")
        pad = gen.get("pad_token_id", 0) if pad_token_id is None else pad_token_id
        if pad is None:
            pad = int(stop[0]) if stop[0] >= 0 else 0
        if not 0 <= sampling.token_id("pad_token_id", pad) < vocab:
            raise InputError(f"pad_token_id must lie in [0, {vocab}), got {pad}")
        seed = kw.pop("seed", None)
        unknown = set(kw) - {"temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                             "presence_penalty"}
        if unknown:
            raise InputError(f"unknown generation argument(s): {', '.join(sorted(unknown))}")
        sp, flags = sampling.make_sampling(batch, **kw)
        flags = dataclasses.replace(flags, logprobs=bool(logprobs))
        key = sampling.prng_key(seed)
        ctl = Controls(sp, jnp.asarray(stop), jnp.asarray(int(pad), jnp.int32))
        return ctl, flags, key

    def _check_capacity(self, prompt_len: int, max_new: int, batch: int, cache_len: int):
        limit = self.cfg.text.max_position_embeddings
        if prompt_len + max_new > limit:
            raise InputError(f"prompt of {prompt_len} tokens + max_new_tokens={max_new} = {prompt_len + max_new} "
                             f"exceeds the model's context of {limit} tokens")
        need = kv_cache.cache_bytes(self.cfg.text, batch, cache_len, self.model.dtype)
        mesh = getattr(self.model, "mesh", None)
        if mesh is not None:  # each device holds one block of the sharded cache
            shape = (self.cfg.text.num_hidden_layers, batch, cache_len, self.cfg.text.num_key_value_heads,
                     self.cfg.text.head_dim)
            need = need * int(np.prod(kv_cache.cache_sharding(self.cfg.text, mesh, batch).k.shard_shape(shape))) // \
                int(np.prod(shape))
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
        first = prepare_inputs(self.cfg, **inputs)  # validates everything, in the caller's layout
        ids, mask = _compact_left(first.input_ids, first.mask)
        rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        inp = prepare_inputs(self.cfg, ids, mask, **rest)
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

    def _vision(self, req: Request):
        if req.vision is None:
            return None
        feats, deepstack = vision_tower(*self.model.split, req.vision)
        return feats, deepstack, jnp.asarray(req.feat_index)

    def start(self, req: Request, cache: kv_cache.KVCache, max_new: int, ctl, flags, key, want_logits: bool):
        n_out = bucket_length(max_new, 16)
        read_len = min(cache.max_len, bucket_length(int(cache.end) + req.ids.shape[1], MIN_READ))
        return prefill(*self.model.split, flags, read_len, n_out, want_logits,
                       jnp.asarray(req.ids), jnp.asarray(req.positions), jnp.asarray(req.valid),
                       jnp.asarray(req.last_idx), self._vision(req), cache, jnp.asarray(req.delta), ctl,
                       jnp.asarray(max_new, jnp.int32), key,
                       jnp.asarray(req.seen_ids) if flags.repetition else None, mesh=self.mesh)

    def run_loop(self, state: DecodeState, ctl, flags) -> DecodeState:
        max_len = state.cache.max_len
        while True:
            step, end, all_done = jax.device_get((state.step, state.cache.end, jnp.all(state.done)))
            if all_done or step >= int(state.max_new):
                return state
            read_len = min(max_len, bucket_length(int(end) + 1, MIN_READ))
            state = decode_loop(*self.model.split, flags, read_len, state, ctl, mesh=self.mesh)

    def steps(self, state: DecodeState, ctl, flags) -> Iterator[DecodeState]:
        """The streaming driver: one jitted step per token, yielding the state after each."""
        max_len = state.cache.max_len
        yield state
        while True:
            step, end, all_done = jax.device_get((state.step, state.cache.end, jnp.all(state.done)))
            if all_done or step >= int(state.max_new):
                return
            read_len = min(max_len, bucket_length(int(end) + 1, MIN_READ))
            state = decode_one(*self.model.split, flags, read_len, state, ctl, mesh=self.mesh)
            yield state

    def new_cache(self, batch: int, max_len: int) -> kv_cache.KVCache:
        mesh = getattr(self.model, "mesh", None)  # a sharded model's cache is sharded alike
        return kv_cache.allocate(self.cfg.text, batch, max_len, self.model.dtype, mesh)


def finish(state: DecodeState, ctl: Controls, return_logprobs: bool, return_logits: bool,
           **extra) -> GenerateOutput:
    tokens, logprobs, step, stop, bad = jax.device_get((state.tokens, state.logprobs, state.step, ctl.stop_ids,
                                                        state.bad_step))
    if (bad >= 0).any():
        row = int(np.flatnonzero(bad >= 0)[0])
        raise NumericalError(f"the model produced NaN/inf logits (batch row {row}, new token {int(bad[row])}); "
                             "check the weights, or use float32 if a low-precision dtype overflowed")
    n = int(step)
    tokens = np.asarray(tokens[:, :n], np.int32)
    is_stop = np.isin(tokens, stop[stop >= 0])
    lengths = np.where(is_stop.any(1), is_stop.argmax(1) + 1, n).astype(np.int32)
    out = GenerateOutput(tokens=tokens, lengths=lengths, **extra)
    if return_logprobs:
        out.logprobs = np.asarray(logprobs[:, :n], np.float32)
    if return_logits:
        out.logits = np.asarray(jax.device_get(state.logits)[:, :n], np.float32)
    return out


def _split_generate_kwargs(kwargs: dict) -> tuple[dict, dict]:
    inputs = {k: kwargs.pop(k) for k in list(kwargs) if k in _INPUT_NAMES}
    return inputs, kwargs


_INPUT_NAMES = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                "video_grid_thw", "mm_token_type_ids")


def _cache_len(needed: int) -> int:
    return bucket_length(needed, MIN_READ)


def _begin(model, max_new_tokens, stop_token_ids, pad_token_id, want_logits, kwargs, want_logprobs=False):
    """Checks a request, allocates its cache and runs the prefill: (generator, request, controls,
    flags, state after the first token, prefill seconds)."""
    inputs, kw = _split_generate_kwargs(kwargs)
    gen = Generator(model)
    req = gen.request(inputs)
    b, t = req.ids.shape
    ctl, flags, key = gen._controls(b, max_new_tokens, stop_token_ids, pad_token_id, kw, want_logprobs)
    cache_len = _cache_len(t + max_new_tokens)
    gen._check_capacity(req.prompt_len, max_new_tokens, b, cache_len)
    t0 = time.perf_counter()
    state = gen.start(req, gen.new_cache(b, cache_len), max_new_tokens, ctl, flags, key, want_logits)
    jax.block_until_ready(state.tokens)
    return gen, req, ctl, flags, state, time.perf_counter() - t0


def generate(model, max_new_tokens: int = 64, stop_token_ids=None, pad_token_id=None, return_logprobs=False,
             return_logits=False, **kwargs) -> GenerateOutput:
    """See `Model.generate`."""
    gen, req, ctl, flags, state, prefill_s = _begin(model, max_new_tokens, stop_token_ids, pad_token_id,
                                                    return_logits, kwargs, return_logprobs)
    t1 = time.perf_counter()
    state = gen.run_loop(state, ctl, flags)
    jax.block_until_ready(state.tokens)
    return finish(state, ctl, return_logprobs, return_logits, prompt_tokens=req.prompt_len,
                  prefill_s=prefill_s, decode_s=time.perf_counter() - t1)


def stream(model, max_new_tokens: int = 64, stop_token_ids=None, pad_token_id=None, **kwargs) -> Iterator[np.ndarray]:
    """See `Model.stream`: yields np.int32 [b] (the next token of each row, pad once a row stopped)."""
    gen, _, ctl, flags, state, _ = _begin(model, max_new_tokens, stop_token_ids, pad_token_id, False, kwargs)
    for state in gen.steps(state, ctl, flags):
        step = int(state.step)
        yield np.asarray(jax.device_get(state.tokens[:, step - 1]), np.int32)


def _image_digests(pixels, grid) -> list[str]:
    """One digest per image/video (its grid and pixel bytes): tells apart different images behind the
    same placeholder token ids."""
    if grid is None:
        return []
    grid = np.asarray(grid)
    pixels = np.ascontiguousarray(np.asarray(pixels, np.float32))
    out, at = [], 0
    for g in grid:
        n = int(np.prod(g))
        out.append(hashlib.sha256(g.astype(np.int64).tobytes() + pixels[at:at + n].tobytes()).hexdigest())
        at += n
    return out


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
        self._cache: kv_cache.KVCache | None = None
        self._cached_ids = np.zeros(0, np.int32)  # token ids whose keys/values are in the cache
        self._digests: list[str] = []  # images then videos, in prompt order, of the cached tokens

    @property
    def cached_tokens(self) -> int:
        return len(self._cached_ids)

    def _reusable(self, ids: np.ndarray, digests: list[str], n_prefix_media: int) -> bool:
        n = len(self._cached_ids)
        return (self._cache is not None and 0 < n < len(ids) and np.array_equal(ids[:n], self._cached_ids)
                and digests[:n_prefix_media] == self._digests[:n_prefix_media]
                and len(self._digests) == n_prefix_media)

    def generate(self, max_new_tokens: int = 64, stop_token_ids=None, pad_token_id=None, return_logprobs=False,
                 return_logits=False, **kwargs) -> GenerateOutput:
        with device_memory_errors("chat generate"):
            return self._generate(max_new_tokens, stop_token_ids, pad_token_id, return_logprobs, return_logits,
                                  **kwargs)

    def _generate(self, max_new_tokens, stop_token_ids, pad_token_id, return_logprobs, return_logits,
                  **kwargs) -> GenerateOutput:
        inputs, kw = _split_generate_kwargs(kwargs)
        cfg = self.model.config
        full = prepare_inputs(cfg, **inputs)
        if full.input_ids.shape[0] != 1:
            raise InputError(f"a chat session holds one conversation; got a batch of {full.input_ids.shape[0]}")
        ids = full.input_ids[0][full.mask[0] > 0]
        inputs = dict(inputs, input_ids=ids[None], attention_mask=None, mm_token_type_ids=None)
        full = prepare_inputs(cfg, **inputs)
        img_grid, vid_grid = inputs.get("image_grid_thw"), inputs.get("video_grid_thw")
        digests = (_image_digests(inputs.get("pixel_values"), img_grid)
                   + _image_digests(inputs.get("pixel_values_videos"), vid_grid))
        ctl, flags, key = self._gen._controls(1, max_new_tokens, stop_token_ids, pad_token_id, kw, return_logprobs)
        total = len(ids)

        # Which images / videos lie in the cached prefix (their placeholder runs end before it).
        n = len(self._cached_ids)
        media = _media_runs(ids, cfg, img_grid, vid_grid)  # [(kind, index, start, end)] in prompt order
        in_prefix = [m for m in media if m[3] <= n]
        split = any(m[2] < n < m[3] for m in media)
        reuse = not split and self._reusable(ids, _order_digests(digests, media), len(in_prefix))
        if not reuse:
            self.reset()
            n, in_prefix = 0, []
        new_media = media[len(in_prefix):]

        # The chunk to prefill: the new tokens, right-padded to a bucket, at the cache end.
        chunk = ids[n:]
        tb = bucket_length(len(chunk))
        pad = tb - len(chunk)
        vision, feat_index = _suffix_vision(cfg, inputs, new_media, ids, n, tb)
        req = Request(
            ids=np.pad(chunk, (0, pad))[None], positions=np.pad(full.positions[:, :, n:], ((0, 0), (0, 0), (0, pad))),
            valid=(np.arange(tb) < len(chunk))[None], last_idx=np.array([len(chunk) - 1], np.int32),
            delta=full.rope_delta, vision=vision, feat_index=feat_index,
            seen_ids=ids[None].astype(np.int32), prompt_len=total)
        needed = n + tb + max_new_tokens
        cap = max(self._max_cache_len or 0, needed)
        self._gen._check_capacity(total, max_new_tokens, 1, _cache_len(cap))
        if self._cache is None:
            self._cache = self._gen.new_cache(1, _cache_len(cap))
        elif self._cache.max_len < needed:
            self._cache = kv_cache.grow(self._cache, _cache_len(cap))
        t0 = time.perf_counter()
        state = self._gen.start(req, self._cache, max_new_tokens, ctl, flags, key, return_logits)
        jax.block_until_ready(state.tokens)
        t1 = time.perf_counter()
        state = self._gen.run_loop(state, ctl, flags)
        out = finish(state, ctl, return_logprobs, return_logits, prompt_tokens=total, reused_tokens=n,
                     prefill_s=t1 - t0, decode_s=time.perf_counter() - t1)
        # The cache now holds the conversation and every new token but the last (never fed).
        self._cache = state.cache
        fed = out.tokens[0, : out.lengths[0] - 1]
        self._cached_ids = np.concatenate([ids, fed]).astype(np.int32)
        self._digests = _order_digests(digests, media)
        return out


def _media_runs(ids: np.ndarray, cfg: Qwen3VLConfig, img_grid, vid_grid) -> list[tuple[str, int, int, int]]:
    """(kind, index within its kind, first token, end token) of every image and video, in prompt order.

    A video's temporal steps are separate runs; its span runs from its first step to its last."""
    from qvl_jax.modeling.positions import IMAGE, VIDEO, _runs, token_types

    runs = [r for r in _runs(token_types(ids, cfg.image_token_id, cfg.video_token_id)) if r[0] != 0]
    out, r = [], 0
    counters = {IMAGE: 0, VIDEO: 0}
    grids = {IMAGE: [] if img_grid is None else list(np.asarray(img_grid)),
             VIDEO: [] if vid_grid is None else list(np.asarray(vid_grid))}
    while r < len(runs):
        kind = runs[r][0]
        i = counters[kind]
        counters[kind] += 1
        steps = int(grids[kind][i][0]) if kind == VIDEO else 1
        first, last = runs[r], runs[r + steps - 1]
        out.append(("image" if kind == IMAGE else "video", i, first[1], last[2]))
        r += steps
    return out


def _order_digests(digests: list[str], media) -> list[str]:
    """Digests in prompt order (the input lists all images first, then all videos)."""
    n_img = sum(1 for m in media if m[0] == "image")
    return [digests[i] if kind == "image" else digests[n_img + i] for kind, i, _, _ in media]


def _suffix_vision(cfg: Qwen3VLConfig, inputs: dict, new_media, ids: np.ndarray, n: int, tb: int):
    """VisionInputs for the images/videos whose tokens are in the new chunk, and the chunk's feature
    index into their features (images first, then videos, as prepare_inputs orders them)."""
    from qvl_jax.modeling import vision as vision_mod

    if not new_media:
        return None, None
    pix, grids, n_img_patches = [], [], 0
    for kind in ("image", "video"):
        grid = inputs.get(f"{kind}_grid_thw")
        if grid is None:
            continue
        grid = np.asarray(grid)
        pixels = np.asarray(inputs.get("pixel_values" if kind == "image" else "pixel_values_videos"))
        offsets = np.concatenate([[0], np.cumsum(grid.prod(-1))])
        for m in new_media:
            if m[0] == kind:
                pix.append(pixels[offsets[m[1]]:offsets[m[1] + 1]])
                grids.append(grid[m[1]])
                n_img_patches += int(grid[m[1]].prod()) if kind == "image" else 0
    grids = vision_mod.check_grid_thw(np.stack(grids), cfg.vision, "grid_thw")
    vis = vision_mod.VisionInputs.build(np.concatenate(pix), grids, cfg.vision, vision_bucket(int(grids.prod(-1).sum())))
    chunk = ids[n:]
    index = np.full(tb, -1, np.int32)
    n_img = n_img_patches // cfg.vision.spatial_merge_size ** 2
    is_img, is_vid = chunk == cfg.image_token_id, chunk == cfg.video_token_id
    index[: len(chunk)][is_img] = np.arange(int(is_img.sum()))
    index[: len(chunk)][is_vid] = n_img + np.arange(int(is_vid.sum()))
    return vis, index[None]
