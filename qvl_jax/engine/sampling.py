"""Token sampling inside the jitted decode loop: penalties, temperature, top-k, top-p, min-p.

The order follows transformers' generate: repetition penalty, then (OpenAI-style) frequency and
presence penalties, then temperature, top-k, top-p, min-p, then a categorical draw, or argmax for
rows with temperature 0. Every parameter is a per-row array, so one batch can mix requests; which
stages run at all is decided statically (`SamplingFlags`), so greedy decoding pays for none of them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qvl_jax.engine.output import check_stop
from qvl_jax.engine.structured import StructuredOutputs
from qvl_jax.errors import InputError

NEG_INF = -jnp.inf


class SamplingArrays(NamedTuple):
    """Per-row sampling parameters on the device, each [b] (built by `SamplingParams.arrays`).
    Neutral values switch a stage off for that row."""

    temperature: jax.Array  # float32; 0 = greedy
    top_k: jax.Array  # int32; 0 = off
    top_p: jax.Array  # float32; 1 = off
    min_p: jax.Array  # float32; 0 = off
    repetition_penalty: jax.Array  # float32; 1 = off (transformers' definition, over prompt + output)
    frequency_penalty: jax.Array  # float32; 0 = off (subtracts penalty * count over output tokens)
    presence_penalty: jax.Array  # float32; 0 = off (subtracts penalty once a token was output)


@dataclasses.dataclass(frozen=True)
class SamplingFlags:
    """Which stages the compiled sampler contains (static: part of the jit cache key)."""

    sample: bool = False
    top_k: bool = False
    top_p: bool = False
    min_p: bool = False
    repetition: bool = False
    frequency_presence: bool = False
    logprobs: bool = False  # the chosen token's log-probability (a log-softmax over the vocabulary each step)
    top_logprobs: bool = False  # and the MAX_TOP_LOGPROBS most likely tokens with theirs
    constrained: bool = False  # some row's tokens are masked (`Rows.allow`, `allowed`): structured outputs

    @property
    def penalties(self) -> bool:
        return self.repetition or self.frequency_presence


# Token ids travel as int32 on the device; a larger value would wrap around instead of failing.
_INT32_MAX = 2**31 - 1


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def token_id(name: str, value) -> int:
    """One token id given by the user: an int (not a bool, float or string) in [0, 2**31)."""
    if not _is_int(value):
        raise InputError(f"{name} must be an integer token id, got {value!r}")
    if not 0 <= int(value) <= _INT32_MAX:
        raise InputError(f"{name} must lie in [0, 2**31), got {value}")
    return int(value)


def token_ids(name: str, value) -> list[int]:
    """An int or a flat sequence of ints (list, tuple, 1-D integer array) -> list of checked ids."""
    if _is_int(value):
        return [token_id(name, value)]
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or (value.size and value.dtype.kind not in "iu"):
            raise InputError(f"{name} must be an int or a 1-D list of ints, got an array of shape "
                             f"{list(value.shape)} and dtype {value.dtype}")
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{name} must be an int or a list of ints, got {value!r}")
    return [token_id(f"{name}[{i}]", v) for i, v in enumerate(value)]


def prng_key(seed) -> jax.Array:
    """The PRNG key of a request: seed None is 0 (reproducible by default); any other seed must be an
    int in [0, 2**64). jax.random.key keeps only the low 32 bits without x64, so the high word is
    folded in separately: seeds that differ anywhere give different streams."""
    if seed is None:
        return jax.random.key(0)
    if not _is_int(seed):
        raise InputError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise InputError(f"seed must lie in [0, 2**64), got {seed}")
    key = jax.random.key(seed & 0xFFFFFFFF)
    return key if seed < 2**32 else jax.random.fold_in(key, seed >> 32)


# The numeric fields: (name, neutral value, dtype on the device).
_NUMERIC = (("temperature", 0.0, np.float32), ("top_k", 0, np.int32), ("top_p", 1.0, np.float32),
            ("min_p", 0.0, np.float32), ("repetition_penalty", 1.0, np.float32), ("frequency_penalty", 0.0, np.float32),
            ("presence_penalty", 0.0, np.float32))
MAX_TOP_LOGPROBS = 20  # alternatives a request may ask for per token (OpenAI's limit)


def _number_or_rows(name: str, value, neutral):
    """A number, or a flat sequence of numbers (one per batch row) as a tuple; None is the neutral value."""
    if value is None:
        return neutral
    arr = np.asarray(value) if not isinstance(value, (str, bytes)) else np.asarray(None)
    if arr.dtype.kind not in "iuf" or arr.ndim > 1:
        raise InputError(f"{name} must be a number or one number per batch row, got {value!r}")
    if not np.isfinite(arr.astype(np.float64)).all():
        raise InputError(f"{name} must be finite, got {value!r}")
    return tuple(arr.tolist()) if arr.ndim == 1 else arr.item()


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens, validated once, here (one InputError naming the field): what
    `model.generate` / `stream`, `ChatSession.generate`, `engine.submit` and the server take.

    Numeric fields are a number, or for `model.generate` on a batch one number per row. None (or
    absent) is the neutral value: temperature 0 (greedy), top_k 0 (off), top_p 1, min_p 0, the
    penalties off. The order of the stages is transformers' (`choose`). seed: the PRNG seed, an int
    in [0, 2**64) (None: 0); row r of a batch, or one engine request, draws its i-th token with
    fold_in(fold_in(key(seed), r), i), so a request draws the same tokens alone or batched.
    stop_token_ids: None for the model's EOS ids; ignore_eos: stop only at stop_token_ids / stop
    (vLLM's). stop: strings that end the answer (matched on the text; the engine's output
    processor). logprobs: None, or k in [0, 20]: report each new token's log-probability and the k
    most likely tokens with theirs. structured: None, or a `StructuredOutputs` (or a dict of its
    fields: json, json_object, regex, choice, grammar) that the answer must follow (the same for
    every row of a batch)."""

    temperature: float | tuple = 0.0
    top_k: int | tuple = 0
    top_p: float | tuple = 1.0
    min_p: float | tuple = 0.0
    repetition_penalty: float | tuple = 1.0
    frequency_penalty: float | tuple = 0.0
    presence_penalty: float | tuple = 0.0
    seed: int | None = None
    stop_token_ids: tuple | None = None
    stop: tuple = ()
    logprobs: int | None = None
    ignore_eos: bool = False
    structured: StructuredOutputs | None = None

    def __post_init__(self):
        put = functools.partial(object.__setattr__, self)
        for name, neutral, _ in _NUMERIC:
            put(name, _number_or_rows(name, getattr(self, name), neutral))
        rows = {name: np.asarray(getattr(self, name), np.float64) for name, _, _ in _NUMERIC}
        if (rows["temperature"] < 0).any():
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        k = rows["top_k"]
        if (k < 0).any() or (k != np.round(k)).any() or (k > _INT32_MAX).any():
            raise InputError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if ((rows["top_p"] <= 0) | (rows["top_p"] > 1)).any():
            raise InputError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if ((rows["min_p"] < 0) | (rows["min_p"] > 1)).any():
            raise InputError(f"min_p must lie in [0, 1], got {self.min_p!r}")
        if (rows["repetition_penalty"] <= 0).any():
            raise InputError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if self.seed is not None:
            prng_key(self.seed)  # the checks, once
        if self.stop_token_ids is not None:
            put("stop_token_ids", tuple(token_ids("stop_token_ids", self.stop_token_ids)))
        if not isinstance(self.stop, (str, list, tuple)):
            raise InputError(f"stop must be a string or a list of strings, got {self.stop!r}")
        put("stop", check_stop(self.stop))
        n = self.logprobs
        if n is not None and (not _is_int(n) or not 0 <= n <= MAX_TOP_LOGPROBS):
            raise InputError(f"logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}] (alternatives per "
                             f"token), got {n!r}")
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise InputError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if self.structured is not None:
            put("structured", StructuredOutputs.of(self.structured))

    @classmethod
    def from_kwargs(cls, kw: dict) -> "SamplingParams":
        """From keyword arguments as `model.generate` takes them (one InputError for unknown names)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(kw) - names
        if unknown:
            raise InputError(f"unknown generation argument(s): {', '.join(sorted(unknown))}")
        return cls(**kw)

    @property
    def flags(self) -> "SamplingFlags":
        """The stages the compiled sampler needs for these values. A constrained sampler always holds
        the draw (greedy rows still take the argmax: `choose`), so that greedy and sampled constrained
        requests, alone or batched with others, share one set of compiled programs, which a server's
        warm-up compiles once (`Engine.warm_up`) instead of twice."""
        t = np.asarray(self.temperature)
        sample = bool((t > 0).any()) or self.structured is not None
        return SamplingFlags(
            sample=sample,
            top_k=sample and bool((np.asarray(self.top_k) > 0).any()),
            top_p=sample and bool((np.asarray(self.top_p) < 1).any()),
            min_p=sample and bool((np.asarray(self.min_p) > 0).any()),
            repetition=bool((np.asarray(self.repetition_penalty) != 1).any()),
            frequency_presence=bool((np.asarray(self.frequency_penalty) != 0).any()
                                    or (np.asarray(self.presence_penalty) != 0).any()),
            logprobs=self.logprobs is not None, top_logprobs=bool(self.logprobs),
            constrained=self.structured is not None)

    def rows(self, batch: int) -> tuple[np.ndarray, ...]:
        """The numeric fields as [batch] numpy arrays, in SamplingArrays order (InputError when a
        per-row field has another length)."""
        out = []
        for name, _, dtype in _NUMERIC:
            arr = np.asarray(getattr(self, name))
            if arr.ndim == 1 and arr.shape[0] != batch:
                raise InputError(f"{name} must be a number or one number per batch row ({batch}), "
                                 f"got {getattr(self, name)!r}")
            out.append(np.broadcast_to(arr, (batch,)).astype(dtype))
        return tuple(out)

    def arrays(self, batch: int) -> tuple[SamplingArrays, "SamplingFlags"]:
        """(device arrays [batch] each, the sampler's static flags)."""
        return SamplingArrays(*jax.device_put(self.rows(batch))), self.flags


def make_sampling(batch: int, **kw) -> tuple[SamplingArrays, "SamplingFlags"]:
    """Sampling arrays and flags for a batch from keyword values (tests and benchmarks)."""
    return SamplingParams(**kw).arrays(batch)


def apply_penalties(logits: jax.Array, sp: SamplingArrays, flags: SamplingFlags, seen: jax.Array | None,
                    counts: jax.Array | None) -> jax.Array:
    """seen [b, v]: token occurs in prompt or output; counts [b, v]: occurrences in the output."""
    if flags.repetition:
        rp = sp.repetition_penalty[:, None]
        penalised = jnp.where(logits > 0, logits / rp, logits * rp)
        logits = jnp.where(seen, penalised, logits)
    if flags.frequency_presence:
        c = counts.astype(jnp.float32)
        logits = logits - sp.frequency_penalty[:, None] * c - sp.presence_penalty[:, None] * (c > 0)
    return logits


def allowed(logits: jax.Array, allow: jax.Array) -> jax.Array:
    """logits [b, vocab] with the tokens a packed mask allow [b, ceil(vocab / 32)] (int32, bit i % 32
    of word i // 32 for token i) refuses set to float32's lowest value: finite, so the non-finite
    check keeps its meaning, and never chosen while any token is allowed (its exp is 0)."""
    b, vocab = logits.shape
    bits = (allow[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    ok = bits.reshape(b, -1)[:, :vocab] != 0
    return jnp.where(ok, logits, jnp.finfo(jnp.float32).min)


def warp(logits: jax.Array, sp: SamplingArrays, flags: SamplingFlags) -> jax.Array:
    """Temperature, top-k, top-p, min-p as transformers' warpers: filtered tokens get -inf."""
    t = jnp.where(sp.temperature > 0, sp.temperature, 1.0)[:, None]
    logits = logits / t
    if flags.top_k or flags.top_p:
        sorted_desc = -jnp.sort(-logits, axis=-1)
    if flags.top_k:
        k = jnp.clip(sp.top_k, 1, logits.shape[-1])
        kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
        keep = (sp.top_k[:, None] <= 0) | (logits >= kth)
        logits = jnp.where(keep, logits, NEG_INF)
        sorted_desc = jnp.where(sp.top_k[:, None] > 0,
                                jnp.where(jnp.arange(logits.shape[-1]) < k[:, None], sorted_desc, NEG_INF),
                                sorted_desc)
    if flags.top_p:
        # transformers cuts a token when the ascending cumulative mass up to and including it is
        # <= 1 - top_p; in descending order that mass is 1 - (cumsum before the token). The top
        # token always stays.
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_from_token_down = 1.0 - jnp.cumsum(probs, axis=-1) + probs
        cut = mass_from_token_down <= (1.0 - sp.top_p[:, None])
        cut = cut.at[:, 0].set(False)
        kept_min = jnp.min(jnp.where(cut, jnp.inf, sorted_desc), axis=-1, keepdims=True)
        logits = jnp.where((sp.top_p[:, None] >= 1.0) | (logits >= kept_min), logits, NEG_INF)
    if flags.min_p:
        probs = jax.nn.softmax(logits, axis=-1)
        top = jnp.max(probs, axis=-1, keepdims=True)
        logits = jnp.where(probs < sp.min_p[:, None] * top, NEG_INF, logits)
    return logits


def first_argmax(x: jax.Array) -> jax.Array:
    """argmax over the last axis (the first index of the maximum), int32.

    Written as a max and a min over plain iotas: XLA CPU runs jnp.argmax's pair reduction at half
    the speed of two simple ones (0.76 vs 0.35 ms over 151936 logits), and under a vocab-sharded mesh
    these become two ordinary all-reduces. A row without a maximum (NaN) gives the last index; such
    rows are stopped and reported by the caller."""
    n = x.shape[-1]
    top = jnp.max(x, axis=-1, keepdims=True)
    idx = jnp.min(jnp.where(x == top, jnp.arange(n, dtype=jnp.int32), n - 1), axis=-1)
    return idx.astype(jnp.int32)


def choose(key: jax.Array, logits: jax.Array, sp: SamplingArrays, flags: SamplingFlags,
           seen: jax.Array | None = None, counts: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(tokens [b] int32, log-probability of each chosen token under the model [b]; zeros unless
    flags.logprobs)."""
    logits = logits.astype(jnp.float32)
    processed = apply_penalties(logits, sp, flags, seen, counts)
    greedy = first_argmax(processed)
    if flags.sample:
        drawn = jax.random.categorical(key, warp(processed, sp, flags), axis=-1).astype(jnp.int32)
        tokens = jnp.where(sp.temperature > 0, drawn, greedy)
    else:
        tokens = greedy
    if not flags.logprobs:
        return tokens, jnp.zeros(tokens.shape, jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    return tokens, jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
