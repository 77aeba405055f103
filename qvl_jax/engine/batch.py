"""The engine's batch of rows for one jitted step: the host arrays (`steps.Rows`, block tables, last
tokens, the flags of the compiled sampler) built from the requests a plan names. Rows past the
requests are idle padding (a power-of-two row count compiles once per size): neutral sampling
values, blocks that all point at the trash block, never active."""

from __future__ import annotations

import dataclasses

import numpy as np

from qvl_jax.engine import sampling, steps, structured
from qvl_jax.engine.prefix_cache import TRASH_BLOCK


def padded_rows(n: int, max_rows: int) -> int:
    """Rows a decode loop over n requests runs: the next power of two, at most max_rows."""
    return min(max_rows, 1 << (n - 1).bit_length())


# The rows of a mixed step (`steps.mixed`: its prefilling and decoding requests, then idle rows): this
# many, or max_num_seqs when more requests take part (two programs per chunk length bucket at most;
# idle rows read nothing, so padding costs little). A multiple of 8: the tied lm_head over the step's
# rows costs about the same at 8 and 16 rows on the CPU, and a third more at 9 (2B widths, the 2-core
# CPU, `scripts/bench_matmul.py --layers 0`: 34.8 / 37.2 / 46.1 ms at 8 / 16 / 9 rows;
# docs/performance.md).
MIXED_ROWS = 8


def mixed_rows(n: int, max_rows: int) -> int:
    """Rows of a mixed step in which n requests (at most max_rows, one a slot) prefill or decode."""
    return min(MIXED_ROWS, max_rows) if n <= MIXED_ROWS else max(n, max_rows)


def stop_width(n: int) -> int:
    """Columns of the stop-id array for n ids: at least 8, a power of two (each width compiles)."""
    return max(8, 1 << max(0, n - 1).bit_length())


def rows(reqs: list, s: int, limits=None) -> steps.Rows:
    """The steps' per-row arrays of requests (`EngineRequest`s) in s rows; limits: how far each
    may grow in a decode loop (padding rows: 0). With a constrained request (structured outputs)
    among them, `allow` holds each one's mask of the allowed next tokens (all ones elsewhere)."""
    n = len(reqs)

    def col(values, dtype, fill=0):
        out = np.full(s, fill, dtype)
        out[:n] = values
        return out

    stop = np.full((s, stop_width(max((len(r.stop) for r in reqs), default=0))), -1, np.int32)
    keys = np.zeros((s, 2), np.uint32)
    for i, r in enumerate(reqs):
        stop[i, :len(r.stop)] = r.stop
        keys[i] = r.key
    allow = None
    if any(r.matcher is not None for r in reqs):
        allow = structured.masks([r.matcher for r in reqs], s, next(r.matcher for r in reqs if r.matcher is not None).vocab)
    neutral = sampling.SamplingParams().rows(1)
    sp = sampling.SamplingArrays(*(col([r.sp[f] for r in reqs], a.dtype, a[0]) for f, a in enumerate(neutral)))
    return steps.Rows(slot=col([r.slot for r in reqs], np.int32), seq_len=col([r.num_computed for r in reqs], np.int32),
                      lo=np.zeros(s, np.int32), delta=col([r.delta for r in reqs], np.int32),
                      n_out=col([len(r.outputs) for r in reqs], np.int32),
                      max_new=col([r.max_new for r in reqs], np.int32),
                      limit=np.zeros(s, np.int32) if limits is None else col(limits, np.int32), keys=keys,
                      stop_ids=stop, sampling=sp, allow=allow)


def tables(reqs: list, s: int, slot_tables: np.ndarray) -> np.ndarray:
    """[s, blocks] block tables of the requests' slots; padding rows write to the trash block."""
    out = np.full((s, slot_tables.shape[1]), TRASH_BLOCK, np.int32)
    out[:len(reqs)] = slot_tables[[r.slot for r in reqs]]
    return out


def last_tokens(reqs: list, s: int, first: int = 0) -> np.ndarray:
    """[s] the token each decoding request feeds next (its last output), request i at row first + i."""
    out = np.zeros(s, np.int32)
    out[first:first + len(reqs)] = [r.outputs[-1] for r in reqs]
    return out


def flags(reqs: list) -> sampling.SamplingFlags:
    """The sampler stages any of the requests needs (one compiled sampler serves them all)."""
    return sampling.SamplingFlags(**{f.name: any(getattr(r.flags, f.name) for r in reqs)
                                     for f in dataclasses.fields(sampling.SamplingFlags)})
