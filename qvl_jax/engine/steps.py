"""The jitted steps of generation: one prefill chunk and one multi-step decode loop, shared by every
path. `model.generate`, `model.stream` and `ChatSession` run them over the static preallocated
cache (`cache.StaticCache`); the `Engine` runs them over the paged cache (`paged.PagedCache`). A
cache is a pytree with `view(index, valid, window)`, the `qvl_jax.modeling.kv_cache.KVCache` that the
decoder writes and reads inside the trace, `merge(view)`, the cache after the call, and `cpu`
(static): whether the steps look tokens up through the CPU kernels (`_lookup`).

Rows are the unit of work: a row of a static batch, or one engine request. Everything a row needs
travels in `Rows` (per-row arrays): where its next token goes in its cache (`seq_len`), where its
attention window starts (`lo`, a static batch's left padding), its rotary offset, how many tokens it
produced (its PRNG index), its budget, stop ids, sampling values and PRNG key. Row r of a batch, and
an engine request (row 0 of its own), draws its i-th token with fold_in(its key, i), where its key is
fold_in(key(seed), r): a request draws the same tokens alone, batched, or in the engine.

The decode loop's carry is `DecodeState`. A row runs while it is not done (a stop id, non-finite
logits, its max_new) and below its `limit` (the static cache's attention window, or the end of the
blocks the engine granted); the loop runs up to n_steps steps while a row runs, so the host pays one
round trip per loop, not per token. A row that reached its limit comes back able to go on: the
caller continues it with more room (the next window bucket, more blocks).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qvl_jax import sharding
from qvl_jax.engine import cpu_kernel, packed, sampling
from qvl_jax.engine.paged import MixedView
from qvl_jax.engine.sampling import MAX_TOP_LOGPROBS, SamplingArrays, SamplingFlags
from qvl_jax.modeling.model import Structure


class Rows(NamedTuple):
    """Per-row inputs of a step, each [r]."""

    slot: jax.Array  # int32: the row's line in the penalty history (seen / counts)
    seq_len: jax.Array  # int32: cache index of the row's next token (tokens of it already in the cache)
    lo: jax.Array  # int32: first cache index its attention reads (a static batch's left padding; else 0)
    delta: jax.Array  # int32: rotary position of a generated token = its cache index + delta
    n_out: jax.Array  # int32: tokens generated so far (the PRNG index of the next)
    max_new: jax.Array  # int32
    limit: jax.Array  # int32: decode runs while seq_len < limit
    keys: jax.Array  # [r, 2] uint32: PRNG key data
    stop_ids: jax.Array  # [r, n] int32, -1 = unused
    sampling: SamplingArrays
    allow: jax.Array | None = None  # [r, ceil(vocab / 32)] int32 packed mask of the allowed next tokens
    # (structured outputs, `flags.constrained`; all ones for an unconstrained row), else None


class Tokens(NamedTuple):
    """What a step hands the host: tokens [r, n] (-1 where a row did not run) and, when asked for,
    their log-probabilities [r, n], the top alternatives [r, n, k] and raw logits [r, n, vocab]."""

    tokens: jax.Array
    logprobs: jax.Array | None
    top_ids: jax.Array | None
    top_logprobs: jax.Array | None
    logits: jax.Array | None
    seq_len: jax.Array  # [r] after the call
    last_tok: jax.Array  # [r]: each row's last chosen token (the next call feeds it)
    n_out: jax.Array  # [r]
    active: jax.Array  # [r] bool: the row may go on (not finished; a later call with room continues it)
    bad: jax.Array  # [r] int32: n_out index of the first non-finite logits, -1 none


class DecodeState(NamedTuple):
    """The decode loop's carry."""

    step: jax.Array  # [] int32: steps this loop ran
    cache: object  # the cache pytree
    seen: jax.Array | None  # [slots, vocab] bool: token in prompt or output (repetition penalty only)
    counts: jax.Array | None  # [slots, vocab] int32: occurrences in the output (frequency/presence only)
    seq_len: jax.Array  # [r]
    n_out: jax.Array  # [r]
    last_tok: jax.Array  # [r]: the token fed next
    embed: jax.Array | None  # [r, 1, d]: its input embedding (greedy under a mesh, `_carry_embed`)
    done: jax.Array  # [r] bool: finished for good (stop id, non-finite logits, budget spent)
    active: jax.Array  # [r] bool: runs this step (not done, and below its limit)
    bad: jax.Array  # [r] int32
    out: tuple  # per-step buffers [r, n_steps, ...]: tokens, logprobs, top ids, top logprobs, logits (or None)


@functools.lru_cache(maxsize=4096)
def row_keys(seed: int | None, rows: int) -> np.ndarray:
    """[rows, 2] uint32 key data of rows 0..rows-1 of a request with this seed: fold_in(key(seed), r).
    Cached (read-only): deriving them costs more host time than a short generate call."""
    out = np.asarray(_row_keys(sampling.prng_key(seed), rows), np.uint32)
    out.setflags(write=False)
    return out


@functools.partial(jax.jit, static_argnums=1)
def _row_keys(key: jax.Array, rows: int) -> jax.Array:
    return jax.vmap(lambda r: jax.random.key_data(jax.random.fold_in(key, r)))(jnp.arange(rows))


def _lookup(m, cache):
    """The token embedding lookup a step runs: where the engine's paged cache uses the CPU kernels
    (`PagedCache.cpu`), a copy of the rows (XLA:CPU looks up bfloat16 rows inside a loop on a
    float32 copy of the whole table, ~250 ms a call at 2B widths); else the model's own."""
    if cache.cpu:
        table = m.model.language_model.embed_tokens.weight[...]
        return lambda ids: cpu_kernel.take_rows(table, ids)
    return m.embed


# ---------------------------------------------------------------------------------------------
# Choosing tokens


# Under a mesh, greedy decoding chooses its token with `_greedy_by_blocks`, and also hands the next
# step its input embedding while the all-gather that carries it stays below this size; past it (large
# batches) the next step looks the token up in the vocab-split table instead: one all-reduce of
# [b, d] more per step, but fewer bytes than gathering every block's candidate row.
CARRY_EMBED_MAX_BYTES = 4 << 20


def _carry_embed(m, flags: SamplingFlags, mesh, rows: int) -> bool:
    """Whether greedy decoding under a mesh also gathers each block's candidate embedding row
    (`DecodeState.embed`): only where the vocabulary is split (else the lookup is local anyway) and
    the gather is small."""
    cfg = m.config.text
    n = sharding.vocab_blocks(cfg.vocab_size, mesh)
    return (mesh is not None and not flags.sample and n > 1
            and rows * n * (cfg.hidden_size + 6) * 4 <= CARRY_EMBED_MAX_BYTES)


def _greedy_by_blocks(logits: jax.Array, table: jax.Array | None, sp: SamplingArrays, flags: SamplingFlags,
                      seen: jax.Array | None, counts: jax.Array | None, mesh):
    """Greedy choice over vocab-sharded logits [b, vocab] with one collective: (tokens [b], their
    log-probabilities [b] (None unless flags.logprobs), finite [b], and given the embedding table
    [vocab, d], the tokens' input embeddings [b, 1, d] for the next step).

    Left to itself XLA spends an all-reduce per step for each of: the finite check, the max, the
    first index of the max, and the next step's lookup in the vocab-split embedding table (a masked
    local gather, then a sum). Here each vocabulary block (as the rules split the lm_head output, and
    the embedding rows alike) reduces locally to its candidate: (max, first index of the max, all
    finite), and with the table the candidate's own embedding row. The [b, blocks, fields]
    candidates are gathered everywhere at once, and every device picks the first block holding the
    overall max: the same token as `sampling.first_argmax` over the whole row, and its embedding
    row exactly. Tokens come out whole on every device, so `active` is too, and the loop condition
    needs no collective."""
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
    if flags.logprobs:  # each block's (max logit, sum of exp(logit - max), logit of its candidate)
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
    lp = None
    if flags.logprobs:  # log_softmax at the token, its sum of exponentials assembled from the blocks
        top = jnp.max(cand[..., 3], axis=1)
        lp = (pick[:, 5] - top) - jnp.log(jnp.sum(cand[..., 4] * jnp.exp(cand[..., 3] - top[:, None]), axis=1))
    x = None if table is None else pick[:, None, len(fields):].astype(table.dtype)
    # Pinned whole, or XLA may work on batch shards from here and gather the results again.
    return tuple(None if a is None else sharding.constrain(a, mesh, (None,) * a.ndim) for a in (tok, lp, finite, x))


def choose(m, flags: SamplingFlags, logits: jax.Array, rows: Rows, n_out: jax.Array, seen: jax.Array | None,
           counts: jax.Array | None, mesh=None, carry_embed: bool = False):
    """One token per row from logits [r, vocab] (float32): (tokens [r], finite [r], chosen logprob
    [r] | None, (top ids, top logprobs) [r, k] | None, the tokens' embeddings [r, 1, d] | None).

    Greedy rows take the first maximum after the penalties; sampling rows draw each as a batch of
    one with fold_in(its key, n_out), the draw `model.generate` makes for that row alone. A row whose
    logits are not finite is reported (finite False), never sampled from. Under flags.constrained a
    row chooses among the tokens its rows.allow mask allows. Log-probabilities are the model's
    log-softmax before the mask, penalties, temperature and truncation."""
    sp = rows.sampling
    raw = logits
    if flags.constrained:  # refused tokens get float32's lowest value (finite): see `sampling.allowed`
        logits = sampling.allowed(logits, rows.allow)
    seen_rows = seen[rows.slot] if flags.repetition else None
    count_rows = counts[rows.slot] if flags.frequency_presence else None
    x_next = lp = top = None
    if mesh is not None and not flags.sample and not flags.constrained:
        table = m.model.language_model.embed_tokens.weight[...] if carry_embed else None
        tok, lp, finite, x_next = _greedy_by_blocks(logits, table, sp, flags, seen_rows, count_rows, mesh)
    else:
        finite = jnp.all(jnp.isfinite(raw), axis=-1)
        clean = jnp.where(finite[:, None], logits, 0.0)
        if flags.sample:
            plain = dataclasses.replace(flags, logprobs=False, top_logprobs=False)

            def one(kd, i, lg, sp_row, seen_row, count_row):
                key = jax.random.fold_in(jax.random.wrap_key_data(kd), i)
                sp1 = SamplingArrays(*(a[None] for a in sp_row))
                tok, _ = sampling.choose(key, lg[None], sp1, plain, None if seen_row is None else seen_row[None],
                                         None if count_row is None else count_row[None])
                return tok[0]

            tok = jax.vmap(one)(rows.keys, n_out, clean, sp, seen_rows, count_rows)
        else:
            tok = sampling.first_argmax(sampling.apply_penalties(clean, sp, flags, seen_rows, count_rows))
    if flags.logprobs and (lp is None or flags.top_logprobs):
        lsm = jax.nn.log_softmax(raw, axis=-1)
        lp = jnp.take_along_axis(lsm, tok[:, None], axis=-1)[:, 0]
        if flags.top_logprobs:
            top_lp, top_ids = jax.lax.top_k(lsm, min(MAX_TOP_LOGPROBS, lsm.shape[-1]))
            top = (top_ids.astype(jnp.int32), top_lp)
    return tok, finite, lp, top, x_next


def _record_history(flags: SamplingFlags, seen, counts, slot, tok, live):
    if flags.repetition:
        seen = seen.at[slot, tok].max(live)  # an OR; no read of seen (a vocab-split gather)
    if flags.frequency_presence:
        counts = counts.at[slot, tok].add(live.astype(jnp.int32))
    return seen, counts


@functools.partial(jax.jit, donate_argnames=("seen", "counts"))
def set_history(seen, counts, slot, hist, n_prompt):
    """Resets rows slot [r] of the penalty history: seen = every token of hist [r, L] (-1 padded),
    counts = those at indices >= n_prompt [r] (the generated ones)."""
    valid = hist >= 0
    idx = jnp.where(valid, hist, 0)
    rows = jnp.arange(hist.shape[0])[:, None]
    if seen is not None:
        fresh = jnp.zeros((hist.shape[0], seen.shape[1]), bool).at[rows, idx].max(valid)
        seen = seen.at[slot].set(fresh)
    if counts is not None:
        is_out = valid & (jnp.arange(hist.shape[1])[None] >= n_prompt[:, None])
        fresh = jnp.zeros((hist.shape[0], counts.shape[1]), jnp.int32).at[rows, idx].add(is_out.astype(jnp.int32))
        counts = counts.at[slot].set(fresh)
    return seen, counts


def _stopped(tok: jax.Array, stop_ids: jax.Array) -> jax.Array:
    return jnp.any(tok[:, None] == stop_ids, axis=1)


def _top_buffers(flags: SamplingFlags, m, r: int, n: int, want_logits: bool):
    k = min(MAX_TOP_LOGPROBS, m.config.text.vocab_size)
    return (jnp.zeros((r, n), jnp.float32) if flags.logprobs else None,
            jnp.zeros((r, n, k), jnp.int32) if flags.top_logprobs else None,
            jnp.zeros((r, n, k), jnp.float32) if flags.top_logprobs else None,
            jnp.zeros((r, n, m.config.text.vocab_size), jnp.float32) if want_logits else None)


def _put(buf, col, value):
    return None if buf is None else jax.lax.dynamic_update_index_in_dim(buf, value, col, axis=1)


# ---------------------------------------------------------------------------------------------
# The steps


def _chunk_mask(valid: jax.Array, offset: jax.Array, lo: jax.Array, window: int):
    """(cache index [r, t] of each query of a chunk at offset [r], attention mask [r, t, window]): a
    query sees keys from lo [r] up to itself, earlier cache entries and the chunk's real tokens."""
    t = valid.shape[1]
    index = offset[:, None] + jnp.arange(t)[None]
    j = jnp.arange(window)
    rel = jnp.clip(j[None] - offset[:, None], 0, t - 1)
    chunk_valid = jnp.take_along_axis(valid, rel, axis=1)  # [r, window]: key j is a real token of the chunk
    key_ok = (j[None] >= lo[:, None]) & ((j[None] < offset[:, None])
                                         | ((j[None] < offset[:, None] + t) & chunk_valid))
    return index, key_ok[:, None, :] & (j[None, None, :] <= index[:, :, None])


@functools.partial(jax.jit, static_argnames=("structure", "flags", "window", "want_logits", "mesh"),
                   donate_argnames=("cache", "seen", "counts"))
def prefill(structure: Structure, leaves: list, flags: SamplingFlags, window: int, want_logits: bool, cache,
            seen, counts, ids: jax.Array, positions: jax.Array, valid: jax.Array, offset: jax.Array,
            last_idx: jax.Array, vision, rows: Rows, final: jax.Array, mesh=None):
    """Writes a chunk of each row's sequence into its cache and chooses the row's next token from
    its last real position's logits.

    ids [r, t] at cache indices offset [r] + i; valid [r, t] marks real tokens (a static batch is
    left-padded, an engine chunk right-padded); last_idx [r]: each row's last real token in the
    chunk; window: the cache indices attention reads (static); vision: (features, DeepStack
    features, feature index [r, t]) or None. final [r]: whether the chunk ends the row's known
    sequence (its token counts; a non-final chunk's choice is discarded). (structure, leaves): the
    model, split. Returns (cache, seen, counts, Tokens with one column, rows): rows as given, now on
    the device, for the decode calls that follow (putting host arrays there one by one costs more)."""
    m = structure.merge(leaves)
    r, t = ids.shape
    index, mask = _chunk_mask(valid, offset, rows.lo, window)
    x, deepstack = m.embed_inputs(ids, vision, _lookup(m, cache))
    h, view = m.model.language_model(x, positions, mask, deepstack, cache.view(index, valid, window))
    last = jnp.take_along_axis(h, last_idx[:, None, None], axis=1)
    logits = m.lm_logits(last)[:, 0].astype(jnp.float32)
    tok, finite, lp, top, _ = choose(m, flags, logits, rows, rows.n_out, seen, counts, mesh)
    seen, counts = _record_history(flags, seen, counts, rows.slot, tok, final & finite)
    seq_len = offset + last_idx + 1
    n_out = rows.n_out + final
    active = final & finite & ~_stopped(tok, rows.stop_ids) & (n_out < rows.max_new)
    lps, top_ids, top_lps, out_logits = _top_buffers(flags, m, r, 1, want_logits)
    out = Tokens(tokens=tok[:, None], logprobs=None if lp is None else lp[:, None],
                 top_ids=None if top is None else top[0][:, None], top_logprobs=None if top is None else top[1][:, None],
                 logits=logits[:, None] if want_logits else None, seq_len=seq_len, last_tok=tok, n_out=n_out,
                 active=sharding.constrain(active, mesh, (None,)),
                 bad=jnp.where(finite, -1, rows.n_out).astype(jnp.int32))
    return cache.merge(view), seen, counts, out, rows


def _decode_step(m, flags: SamplingFlags, window: int, rows: Rows, mesh, carry: bool,
                 s: DecodeState) -> DecodeState:
    """Feeds each active row's last token at its seq_len and chooses its next one."""
    whole = functools.partial(sharding.constrain, mesh=mesh, axes=(None,))  # see `decode`
    s = s._replace(seq_len=whole(s.seq_len), n_out=whole(s.n_out), done=whole(s.done), active=whole(s.active),
                   bad=whole(s.bad))
    r = s.seq_len.shape[0]
    positions = jnp.broadcast_to((s.seq_len + rows.delta)[None, :, None], (3, r, 1))
    j = jnp.arange(window)
    mask = ((j[None] >= rows.lo[:, None]) & (j[None] <= s.seq_len[:, None]))[:, None, :]
    x = _lookup(m, s.cache)(s.last_tok[:, None]) if s.embed is None else s.embed
    view = s.cache.view(s.seq_len[:, None], s.active[:, None], window)
    h, view = m.model.language_model(x, positions, mask, None, view)
    logits = m.lm_logits(h)[:, 0].astype(jnp.float32)
    tok, finite, lp, top, x_next = choose(m, flags, logits, rows, s.n_out, s.seen, s.counts, mesh, carry)
    live = s.active & finite
    tok = sharding.constrain(jnp.where(s.active, tok, s.last_tok), mesh, (None,))
    seen, counts = _record_history(flags, s.seen, s.counts, rows.slot, tok, live)
    values = (jnp.where(s.active, tok, -1), None if lp is None else jnp.where(s.active, lp, 0.0),
              None if top is None else top[0], None if top is None else top[1], logits)
    out = tuple(_put(buf, s.step, v) for buf, v in zip(s.out, values))
    seq_len = s.seq_len + s.active
    n_out = s.n_out + s.active
    bad = jnp.where((s.bad < 0) & s.active & ~finite, s.n_out, s.bad)
    done = s.done | (s.active & (~finite | _stopped(tok, rows.stop_ids) | (n_out >= rows.max_new)))
    active = ~done & (seq_len < rows.limit)
    if x_next is not None:  # an inactive row is fed its last token again, as without the carry
        x_next = jnp.where(s.active[:, None, None], x_next, s.embed)
    return DecodeState(step=s.step + 1, cache=s.cache.merge(view), seen=seen, counts=counts, seq_len=whole(seq_len),
                       n_out=whole(n_out), last_tok=tok, embed=x_next, done=whole(done), active=whole(active),
                       bad=whole(bad), out=out)


@functools.partial(jax.jit, static_argnames=("structure", "flags", "window", "n_steps", "want_logits", "mesh"),
                   donate_argnames=("cache", "seen", "counts"))
def decode(structure: Structure, leaves: list, flags: SamplingFlags, window: int, n_steps: int, want_logits: bool,
           cache, seen, counts, last_tok: jax.Array, active: jax.Array, rows: Rows, mesh=None):
    """Up to n_steps decode steps in one `lax.while_loop`, while some row runs; row i feeds
    last_tok[i] at rows.seq_len[i] first. active [r]: the rows that may go on (the others are idle).
    A row runs while it is not done and below rows.limit; one that reached its limit comes back
    active (the caller continues it with more room). window: the cache indices attention reads
    (static). rows.allow (flags.constrained) holds for the first step only: the host computes the
    next mask from the token chosen, so a batch with constrained rows runs n_steps=1. Returns
    (cache, seen, counts, Tokens [r, n_steps])."""
    m = structure.merge(leaves)
    r = last_tok.shape[0]
    carry = _carry_embed(m, flags, mesh, r)
    # Under a mesh the per-row bookkeeping ([r]: cheap) is kept whole on every device, down to
    # `active`: the loop condition's jnp.any then needs no all-reduce over "data".
    whole = functools.partial(jax.tree.map, lambda a: sharding.constrain(a, mesh, (None,) * a.ndim))
    rows, last_tok, active = whole(rows), whole(last_tok), whole(active)
    lps, top_ids, top_lps, out_logits = _top_buffers(flags, m, r, n_steps, want_logits)
    out = (jnp.full((r, n_steps), -1, jnp.int32), lps, top_ids, top_lps, out_logits)
    state = DecodeState(step=jnp.zeros((), jnp.int32), cache=cache.start_decode(rows.seq_len.shape[0], window),
                        seen=seen, counts=counts, seq_len=rows.seq_len, n_out=rows.n_out, last_tok=last_tok,
                        embed=m.embed(last_tok[:, None]) if carry else None, done=~active,
                        active=active & (rows.seq_len < rows.limit), bad=jnp.full((r,), -1, jnp.int32), out=out)
    state = jax.lax.while_loop(lambda s: (s.step < n_steps) & jnp.any(s.active),
                               functools.partial(_decode_step, m, flags, window, rows, mesh, carry), state)
    out = Tokens(*state.out, seq_len=state.seq_len, last_tok=state.last_tok, n_out=state.n_out, active=~state.done,
                 bad=state.bad)
    return state.cache.end_decode(), state.seen, state.counts, out


def _embed_aligned(ids: jax.Array, vision: tuple, lookup):
    """`embed_inputs` of chunk tokens ids [1, t] whose vision input is already in token order:
    (features [t, d], DeepStack features [K, t + r, d], feature index [1, t]), row i token i's where
    index[0, i] >= 0, every DeepStack row of another token zero, the last r rows those of the step's
    r decode tokens (`Engine._packed_inputs`). Returns the chunk's embeddings [1, t, d] and the
    DeepStack features [K, 1, t + r, d]: the same values as `embed_inputs`' gathers (and a
    concatenation of zeros for the decode tokens), without them: XLA:CPU gathers bfloat16 rows on
    float32 copies of the operand (~57 ms a 512-token step at 2B widths, 2 cores, for the features
    and the DeepStack features, even for a chunk without media), and pads them so too (~5 ms)."""
    x = lookup(ids)
    feats, deepstack, index = vision
    x = jnp.where((index >= 0)[..., None], feats[None].astype(x.dtype), x)
    return x, (deepstack[:, None].astype(x.dtype) if deepstack.shape[0] else None)


def _rows_logits(m, last: jax.Array, ran: jax.Array) -> jax.Array:
    """Float32 logits [n, vocab] of a mixed step's last hidden states last [n, d] (one a row),
    computed only where they are used: the lm_head (at 2B widths a 1.24 GB read) over every row
    when a row other than the first ran (a decode token, a final chunk), over the first row alone
    when only it ran (the lone request's prompt), and not at all when none did (non-final chunks
    alone). Rows not computed hold zeros, which nothing reads (`ran` is False there). One program
    for the three cases (`lax.switch`): at 9 rows the product took 58 ms against ~25 ms at one row
    on the 2-core CPU, most of the fixed cost of a short chunk."""
    n, vocab = last.shape[0], m.config.text.vocab_size

    def every(last):
        return m.lm_logits(last[None])[0].astype(jnp.float32)

    def first(last):
        row = m.lm_logits(last[None, :1])[0].astype(jnp.float32)
        return jnp.concatenate([row, jnp.zeros((n - 1, vocab), jnp.float32)])

    def none(last):
        return jnp.zeros((n, vocab), jnp.float32)

    return jax.lax.switch(jnp.where(jnp.any(ran[1:]), 2, ran[0].astype(jnp.int32)), [none, first, every], last)


@functools.partial(jax.jit, static_argnames=("structure", "flags", "window", "mesh"),
                   donate_argnames=("cache", "seen", "counts"))
def mixed(structure: Structure, leaves: list, flags: SamplingFlags, window: int, cache, seen, counts, ids: jax.Array,
          positions: jax.Array, valid: jax.Array, index: jax.Array, row: jax.Array, starts: jax.Array,
          last_idx: jax.Array, vision, final: jax.Array, last_tok: jax.Array, active: jax.Array, rows: Rows,
          decode_bucket: jax.Array, mesh=None):
    """Prefill chunks and a decode step in one forward (the engine's paged cache only): the chunks'
    t tokens (packed one after another) and one decode token of each of the r rows run through the
    decoder as one sequence of t + r tokens, each attending over its own row's cache
    (`paged.MixedView`), so the decode rows and every chunk share one read of the weights.

    Rows (of rows and cache.table, r of them): a row prefills (tokens [starts[i], starts[i + 1]) of
    the chunk sequence are its), or decodes (active[i]: feeds last_tok[i] at rows.seq_len[i]), or
    idles. Chunk tokens: ids, positions [3, 1, t], valid [1, t] (real tokens), index [1, t] (each
    token's cache index in its row), row [1, t] (its row), vision in token order (`_embed_aligned`);
    last_idx [r]: a prefilling row's last token in the sequence; final [r]: its chunk ends its known
    sequence (its next token counts). Several prefilling rows need the CPU kernels (`cache.cpu`:
    `paged.PagedCache.packed_view`); otherwise only row 0 may prefill, its chunk at index
    starts[0] = 0 on. The chunk reads the window bucket cache.bucket, the decode rows decode_bucket
    (idle rows then cost little).
    Returns (cache, seen, counts, Tokens [r, 1]): each row's next token (-1 where neither a final
    chunk nor a decode token ran)."""
    m = structure.merge(leaves)
    t, r = ids.shape[1], last_tok.shape[0]
    j = jnp.arange(window)
    prefilling = starts[1:] > starts[:-1]  # [r]
    if cache.cpu:
        first = cache.packed_view(index, row, valid, starts)
        # Query i sees its own row's cache indices from the row's lo up to its own (a padding token
        # none). The bounds [1, t] first, behind a barrier: fused into the [1, t, window] compare,
        # the gather of lo took ~20 ms a 512-token step (2 cores) instead of ~2.
        lo, hi = jax.lax.optimization_barrier((rows.lo[row], jnp.where(valid, index, -1)))
        mask_first = (j[None, None] >= lo[..., None]) & (j[None, None] <= hi[..., None])
    else:
        one = dataclasses.replace(cache, table=cache.table[:1])
        _, mask_first = _chunk_mask(valid, index[:, 0], rows.lo[:1], window)
        first = one.view(index, valid, window)
    second = dataclasses.replace(cache, bucket=decode_bucket)
    seq = rows.seq_len
    mask_second = ((j[None] >= rows.lo[:, None]) & (j[None] <= seq[:, None]))[:, None, :]
    if cache.cpu:  # the kernel skips a row with no allowed key (a prefilling or idle row)
        mask_second = mask_second & active[:, None, None]
    lookup = _lookup(m, cache)
    x, deepstack = _embed_aligned(ids, vision, lookup)
    x = jnp.concatenate([x, lookup(last_tok[:, None]).reshape(1, r, -1).astype(x.dtype)], axis=1)
    positions = jnp.concatenate([positions, jnp.broadcast_to((seq + rows.delta)[None, None], (3, 1, r))], axis=2)
    view = MixedView(first, second.view(seq[:, None], active[:, None], window), t)
    # The chunks' padding tokens (after the last chunk, before the decode rows) skip the products.
    with packed.skip_rows(t + r, starts[-1], t):
        h, view = m.model.language_model(x, positions, (mask_first, mask_second), deepstack, view)
    last = jnp.where(prefilling[:, None], jnp.take(h[0, :t], last_idx, axis=0), h[0, t:])  # [r, d]
    ran = final | active
    logits = _rows_logits(m, last, ran)  # [r, vocab]
    tok, finite, lp, top, _ = choose(m, flags, logits, rows, rows.n_out, seen, counts, mesh)
    seen, counts = _record_history(flags, seen, counts, rows.slot, tok, ran & finite)
    n_out = rows.n_out + ran
    out = Tokens(tokens=jnp.where(ran, tok, -1)[:, None],
                 logprobs=None if lp is None else lp[:, None],
                 top_ids=None if top is None else top[0][:, None], top_logprobs=None if top is None else top[1][:, None],
                 logits=None, seq_len=jnp.where(prefilling, jnp.take(index[0], last_idx) + 1, seq + active),
                 last_tok=tok, n_out=n_out,
                 active=ran & finite & ~_stopped(tok, rows.stop_ids) & (n_out < rows.max_new),
                 bad=jnp.where(finite | ~ran, -1, rows.n_out).astype(jnp.int32))
    return cache.merge(view), seen, counts, out
