"""Prompt-lookup (n-gram) speculative decoding: the config, the proposer and the jitted verify loop.

`SpeculativeConfig` takes vLLM's dict form, {"method": "ngram", "num_speculative_tokens": k,
"prompt_lookup_max": n, "prompt_lookup_min": m}. Each verify step of a row proposes up to k tokens
by matching the last n..m tokens it has (prompt and answer so far; the longest n first) against
everything before them, as vLLM's ngram proposer does: the tokens that followed the earliest such
match are the proposal. One forward then feeds the row's last token and its proposals (k + 1
positions) and chooses a token at each; the row keeps the longest prefix of proposals its choices
agree with, plus the choice after it (the bonus token), so a step yields 1..k + 1 tokens.

The proposer runs on the device, inside the same `lax.while_loop` as the verify steps: each row's
tokens by cache index (`hist`) travel in the loop's carry, the search is a few [rows, length]
comparisons (cheap beside a forward), and the host pays one round trip per loop of up to n_steps
verify steps, as the plain decode loop does, instead of one per step for a host-side proposer.
A step in which no row has a proposal runs a plain one-token forward (`lax.cond`), so text with
nothing to copy costs about what plain decoding costs.

Choosing: position j of a row chooses exactly as plain decoding chooses the row's token n_out + j
(`steps.choose`: greedy, or a draw with fold_in(row key, n_out + j)), and the proposal at j is
accepted when it equals that choice. Greedy output is therefore plain greedy output. For sampling
this is the standard rejection rule for a deterministic proposal x (q a point mass): x is accepted
with probability p(x), and on rejection the token is distributed as p with x removed and
renormalised (normalize(max(p - q, 0))), which is what a draw from p is, given that it is not x.
Realised with the draws plain decoding makes, a seed gives the same tokens with or without
speculation.

Rollback: a rejected position's keys and values were written at cache indices past the row's new
seq_len, which attention never reads and the next step writes over; the static cache writes per row
(`RowsStaticView`: rows advance by different amounts), the paged cache through the block table (past
the row's granted blocks: the trash block). The engine advances a request by its accepted tokens
only, so the prefix cache registers only blocks of accepted tokens (`speculative_engine`).

Not combined with speculation (refused by `model.generate`, decoded plainly by the engine):
penalties, logprobs, structured outputs, raw logits; the engine refuses the Pallas kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qvl_jax.engine import steps
from qvl_jax.engine.cache import StaticCache
from qvl_jax.engine.sampling import SamplingFlags
from qvl_jax.errors import InputError
from qvl_jax.modeling.kv_cache import KVCache
from qvl_jax.modeling.model import Structure

MAX_SPECULATIVE_TOKENS = 16  # proposals per step (each is a query position of every verify forward)
MAX_LOOKUP = 16  # longest n-gram matched (each length is a comparison over the row's tokens)



@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """Prompt-lookup speculation settings, as vLLM names them. Build with `SpeculativeConfig.of`."""

    num_speculative_tokens: int
    prompt_lookup_max: int
    prompt_lookup_min: int
    method: str = "ngram"
    # Test hook: "always" accepts every proposal whatever the model chooses, a wrong rule that the
    # distribution test must catch. Part of the config, so that it is part of the compiled loop's key.
    _rule: str = "match"

    @classmethod
    def of(cls, value) -> "SpeculativeConfig | None":
        """None, a SpeculativeConfig, or vLLM's dict form: {"method": "ngram",
        "num_speculative_tokens": k, "prompt_lookup_max": n, "prompt_lookup_min": m}. As vLLM: n and
        m default to each other, both to 5 when neither is given. InputError for anything else."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise InputError(f"speculative_config must be a dict such as {{\"method\": \"ngram\", "
                             f"\"num_speculative_tokens\": 4}}, got {type(value).__name__}")
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}
        unknown = sorted(set(value) - known, key=str)
        if unknown:
            raise InputError(f"unknown speculative_config key(s): {', '.join(map(str, unknown))} "
                             f"(known: {', '.join(sorted(known))})")
        method = value.get("method", "ngram")
        if method != "ngram":
            raise InputError(f"speculative_config method must be \"ngram\" (prompt lookup), got {method!r}")
        if "num_speculative_tokens" not in value:
            raise InputError("speculative_config needs num_speculative_tokens")
        k = _count("num_speculative_tokens", value["num_speculative_tokens"], MAX_SPECULATIVE_TOKENS)
        n, m = value.get("prompt_lookup_max"), value.get("prompt_lookup_min")
        if n is None and m is None:
            n = m = 5
        m = None if m is None else _count("prompt_lookup_min", m, MAX_LOOKUP)
        n = m if n is None else _count("prompt_lookup_max", n, MAX_LOOKUP)
        m = n if m is None else m
        if m > n:
            raise InputError(f"speculative_config prompt_lookup_min ({m}) must be <= prompt_lookup_max ({n})")
        return cls(num_speculative_tokens=k, prompt_lookup_max=n, prompt_lookup_min=m)


def _count(name: str, value, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= most:
        raise InputError(f"speculative_config {name} must be an integer in [1, {most}], got {value!r}")
    return int(value)


def unsupported(flags: SamplingFlags) -> str | None:
    """What of a request's settings speculation cannot serve (None: nothing): the verify step
    chooses several tokens of a row at once, from logits computed before any of them is known."""
    if flags.penalties:
        return "repetition, frequency and presence penalties"
    if flags.logprobs:
        return "logprobs"
    if flags.constrained:
        return "structured outputs"
    return None


# ---------------------------------------------------------------------------------------------
# The proposer


def propose(hist: jax.Array, seq_len: jax.Array, lo: jax.Array, spec: SpeculativeConfig):
    """(proposals [r, k] int32, how many of them are real [r]) for rows whose tokens by cache index
    are hist [r, H] (index seq_len [r] holds the last token; real tokens start at lo [r]).

    The suffix of n tokens ending at seq_len is matched at every earlier end position p (p <
    seq_len); the longest n in [prompt_lookup_min, prompt_lookup_max] with a match wins, and among
    its matches the earliest; the proposal is the up to k tokens after it (at most up to seq_len)."""
    r, width = hist.shape
    k, n_max, n_min = spec.num_speculative_tokens, spec.prompt_lookup_max, spec.prompt_lookup_min
    pos = jnp.arange(width)[None]
    rows = jnp.arange(r)[:, None]
    match = pos < seq_len[:, None]
    best_n = jnp.zeros(r, jnp.int32)
    best_p = jnp.zeros(r, jnp.int32)
    for j in range(n_max):
        want = hist[rows[:, 0], jnp.clip(seq_len - j, 0, width - 1)]  # the suffix's j-th token from the end
        before = jnp.pad(hist, ((0, 0), (j, 0)), constant_values=-1)[:, :width]  # hist[p - j] at p
        match = match & (pos - j >= lo[:, None]) & (before == want[:, None]) & (seq_len - j >= lo)[:, None]
        if j + 1 >= n_min:
            found = jnp.any(match, axis=1)
            first = jnp.argmax(match, axis=1).astype(jnp.int32)
            best_n = jnp.where(found, j + 1, best_n)
            best_p = jnp.where(found, first, best_p)
    n_draft = jnp.where(best_n > 0, jnp.minimum(k, seq_len - best_p), 0).astype(jnp.int32)
    idx = jnp.clip(best_p[:, None] + 1 + jnp.arange(k)[None], 0, width - 1)
    return jnp.take_along_axis(hist, idx, axis=1), n_draft


def propose_host(tokens, spec: SpeculativeConfig) -> list[int]:
    """The proposal for one sequence of tokens on the host (plain Python: the reference the tests
    hold `propose` to)."""
    tokens = list(tokens)
    last = len(tokens) - 1
    for n in range(spec.prompt_lookup_max, spec.prompt_lookup_min - 1, -1):
        if n > len(tokens):
            continue
        suffix = tokens[len(tokens) - n:]
        for p in range(n - 1, last):
            if tokens[p - n + 1:p + 1] == suffix:
                return tokens[p + 1:p + 1 + spec.num_speculative_tokens]
    return []


# ---------------------------------------------------------------------------------------------
# The static cache, written per row


class RowsStaticView(KVCache):
    """A static cache's view for a verify step: row i's tokens go to cache indices index[i] (rows
    advance by their own accepted counts, so they no longer share a write index as `StaticView`
    assumes); invalid tokens are dropped; attention reads the first read_len entries."""

    def __init__(self, k: jax.Array, v: jax.Array, index: jax.Array, valid: jax.Array, read_len: int):
        self.k, self.v, self.index, self.valid, self.read_len = k, v, index, valid, read_len

    def update(self, layer: int, k: jax.Array, v: jax.Array):
        b = k.shape[0]
        at = jnp.where(self.valid, self.index, self.k.shape[2])  # past the end: dropped
        rows = jnp.arange(b)[:, None]
        ck = self.k.at[layer, rows, at].set(k.astype(self.k.dtype), mode="drop")
        cv = self.v.at[layer, rows, at].set(v.astype(self.v.dtype), mode="drop")
        return (ck[layer, :, :self.read_len], cv[layer, :, :self.read_len],
                RowsStaticView(ck, cv, self.index, self.valid, self.read_len))


def _view(cache, index: jax.Array, valid: jax.Array, window: int):
    if isinstance(cache, StaticCache):
        return RowsStaticView(cache.k, cache.v, index, valid, window)
    return cache.view(index, valid, window)


# ---------------------------------------------------------------------------------------------
# The verify loop


class SpecState(NamedTuple):
    """The verify loop's carry (fields as `steps.DecodeState`'s where they share a name)."""

    step: jax.Array  # [] int32
    cache: object
    hist: jax.Array  # [r, H] int32: each row's token at each cache index (-1: none); seq_len holds last_tok
    seq_len: jax.Array  # [r]
    n_out: jax.Array  # [r]
    last_tok: jax.Array  # [r]
    done: jax.Array  # [r] bool
    active: jax.Array  # [r] bool
    bad: jax.Array  # [r] int32
    col: jax.Array  # [r] int32: tokens this call wrote to out
    proposed: jax.Array  # [r] int32: proposals verified this call
    accepted: jax.Array  # [r] int32: proposals accepted (and emitted) this call
    out: jax.Array  # [r, n_steps * (k + 1)] int32, -1 past each row's col


class SpecTokens(NamedTuple):
    """What a verify loop hands the host: each row's new tokens left-aligned in tokens [r, n] (-1
    after them), and the row state after the call, as `steps.Tokens` has it."""

    tokens: jax.Array
    seq_len: jax.Array
    last_tok: jax.Array
    n_out: jax.Array
    active: jax.Array
    bad: jax.Array
    hist: jax.Array
    proposed: jax.Array
    accepted: jax.Array


def _flat_rows(rows: steps.Rows, q: int) -> steps.Rows:
    """rows with each row repeated q times (position j of row i at i * q + j), for `steps.choose`."""
    rep = functools.partial(jnp.repeat, repeats=q, axis=0, total_repeat_length=rows.keys.shape[0] * q)
    return jax.tree.map(rep, rows._replace(allow=None))


def _verify_step(m, flags: SamplingFlags, window: int, rows: steps.Rows, mesh, rule: str, q: int,
                 draft: jax.Array, n_draft: jax.Array, s: SpecState) -> SpecState:
    """One forward of q positions per active row: its last token, then its first q - 1 proposals
    (n_draft [r] of them real; q = 1: a plain decode step); keeps the agreed prefix and the bonus."""
    r = s.seq_len.shape[0]
    j = jnp.arange(q)
    n_draft = jnp.minimum(n_draft, q - 1)
    fed = jnp.concatenate([s.last_tok[:, None], draft[:, :q - 1]], axis=1)  # [r, q]
    index = s.seq_len[:, None] + j[None]
    valid = s.active[:, None] & (j[None] <= n_draft[:, None])
    positions = jnp.broadcast_to((index + rows.delta[:, None])[None], (3, r, q))
    keys = jnp.arange(window)
    mask = (keys[None, None] >= rows.lo[:, None, None]) & (keys[None, None] <= index[:, :, None])
    h, view = m.model.language_model(m.embed(fed), positions, mask, None, _view(s.cache, index, valid, window))
    logits = m.lm_logits(h).astype(jnp.float32).reshape(r * q, -1)
    n_at = (s.n_out[:, None] + j[None]).reshape(-1)
    tok, finite, _, _, _ = steps.choose(m, flags, logits, _flat_rows(rows, q), n_at, None, None, mesh)
    tok, finite = tok.reshape(r, q), finite.reshape(r, q)
    # a: leading proposals equal to the choice at their position; then the bonus token.
    agree = (draft[:, :q - 1] == tok[:, :q - 1]) if rule == "match" else jnp.ones((r, q - 1), bool)
    agree = agree & (j[None, :q - 1] < n_draft[:, None])
    a = jnp.sum(jnp.cumprod(agree.astype(jnp.int32), axis=1), axis=1)
    if rule != "match":  # the wrong rule emits the proposals themselves
        tok = jnp.where(j[None] < a[:, None], jnp.pad(draft[:, :q - 1], ((0, 0), (0, 1))), tok)
    # Cut after the first non-finite position or stop id among the a + 1 kept tokens.
    kept = j[None] <= a[:, None]
    stop = jnp.any(tok[:, :, None] == rows.stop_ids[:, None, :], axis=2)
    ends = kept & (~finite | stop)
    e = jnp.where(jnp.any(ends, axis=1), jnp.argmax(ends, axis=1) + 1, a + 1)
    e = jnp.where(s.active, e, 0).astype(jnp.int32)
    emit = j[None] < e[:, None]
    first_bad = jnp.argmax(emit & ~finite, axis=1)
    bad = jnp.where((s.bad < 0) & jnp.any(emit & ~finite, axis=1), s.n_out + first_bad, s.bad).astype(jnp.int32)
    rows_i = jnp.arange(r)[:, None]
    cols = jnp.where(emit, s.col[:, None] + j[None], s.out.shape[1])
    out = s.out.at[rows_i, cols].set(tok, mode="drop")
    hist = s.hist.at[rows_i, jnp.where(emit, index + 1, s.hist.shape[1])].set(tok, mode="drop")
    last = jnp.take_along_axis(tok, jnp.maximum(e - 1, 0)[:, None], axis=1)[:, 0]
    seq_len, n_out = s.seq_len + e, s.n_out + e
    done = s.done | (s.active & (jnp.any(emit & (~finite | stop), axis=1) | (n_out >= rows.max_new)))
    return SpecState(step=s.step + 1, cache=s.cache.merge(view), hist=hist, seq_len=seq_len, n_out=n_out,
                     last_tok=jnp.where(s.active, last, s.last_tok), done=done, active=~done & (seq_len < rows.limit),
                     bad=bad, col=s.col + e, proposed=s.proposed + jnp.where(s.active, n_draft, 0),
                     accepted=s.accepted + jnp.minimum(a, e), out=out)


def _step(m, flags, window, rows, mesh, spec: SpeculativeConfig, s: SpecState) -> SpecState:
    """Proposes for every row, then runs the verify forward (k + 1 positions) if some active row
    has a proposal, else a plain one-position step."""
    draft, n_draft = propose(s.hist, s.seq_len, rows.lo, spec)
    # No proposal past the budget (the bonus token takes the last place) or the row's room.
    room = jnp.minimum(rows.max_new - s.n_out, rows.limit - s.seq_len) - 1
    n_draft = jnp.where(s.active, jnp.clip(jnp.minimum(n_draft, room), 0, None), 0)
    k = spec.num_speculative_tokens
    return jax.lax.cond(jnp.any(n_draft > 0),
                        functools.partial(_verify_step, m, flags, window, rows, mesh, spec._rule, k + 1),
                        functools.partial(_verify_step, m, flags, window, rows, mesh, spec._rule, 1),
                        draft, n_draft, s)


@functools.partial(jax.jit, static_argnames=("structure", "flags", "window", "n_steps", "spec", "mesh"),
                   donate_argnames=("cache", "hist"))
def verify(structure: Structure, leaves: list, flags: SamplingFlags, window: int, n_steps: int,
           spec: SpeculativeConfig, cache, hist: jax.Array, last_tok: jax.Array, active: jax.Array,
           rows: steps.Rows, mesh=None):
    """Up to n_steps speculative steps (each 1..k + 1 tokens per row) in one `lax.while_loop`, as
    `steps.decode` runs plain ones: row i feeds last_tok[i] at rows.seq_len[i] first; hist [r, H]
    holds each row's tokens by cache index (H > the largest limit). A row runs while it is not done
    (stop id, non-finite logits, max_new) and below rows.limit, and never proposes past either.
    Returns (cache, SpecTokens [r, n_steps * (k + 1)])."""
    m = structure.merge(leaves)
    r = last_tok.shape[0]
    state = SpecState(step=jnp.zeros((), jnp.int32), cache=cache, hist=hist, seq_len=rows.seq_len, n_out=rows.n_out,
                      last_tok=last_tok, done=~active, active=active & (rows.seq_len < rows.limit),
                      bad=jnp.full((r,), -1, jnp.int32), col=jnp.zeros(r, jnp.int32),
                      proposed=jnp.zeros(r, jnp.int32), accepted=jnp.zeros(r, jnp.int32),
                      out=jnp.full((r, n_steps * (spec.num_speculative_tokens + 1)), -1, jnp.int32))
    state = jax.lax.while_loop(lambda s: (s.step < n_steps) & jnp.any(s.active),
                               functools.partial(_step, m, flags, window, rows, mesh, spec), state)
    return state.cache, SpecTokens(tokens=state.out, seq_len=state.seq_len, last_tok=state.last_tok,
                                   n_out=state.n_out, active=~state.done, bad=state.bad, hist=state.hist,
                                   proposed=state.proposed, accepted=state.accepted)
