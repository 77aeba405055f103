"""Compiling an engine's steps before its first request (`Engine.warm_up`).

The engine's jitted programs have few shapes by design: a prefill step per chunk length bucket (with
the decode rows that ride on it, `steps.mixed`: 8 rows, or max_num_seqs beyond; the chunk's
vision input is shaped by its length alone, and the attention window is a traced index into
the engine's window buckets, `paged.PagedCache`), a decode loop per power-of-two row count, and the
vision tower per patch bucket. Each also compiles per sampler configuration (`SamplingFlags`). So
a server can compile everything its common requests will meet before it reports ready, instead of
inside its users' first requests; with the persistent compilation cache a restart loads them.

A constrained sampler (`flags.constrained`: structured outputs, forced tool calls) is its own set of
programs: its rows carry the packed mask of allowed tokens (`Rows.allow`, an input the others do not
have), and its decode loop runs one step (the host computes the next mask from the token chosen),
so the warm-up feeds an all-ones mask and compiles that loop with n_steps=1, as the engine runs it.

The warm-up runs the programs themselves on idle inputs (every token invalid, written to the trash
block; no row active, so a decode loop ends at once), so nothing of the engine's state changes.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from qvl_jax.engine import batch, speculative, steps, structured
from qvl_jax.engine.prefix_cache import TRASH_BLOCK
from qvl_jax.modeling import vision as vision_mod
from qvl_jax.modeling.inputs import bucket_length, vision_bucket
from qvl_jax.modeling.model import vision_tower

# Chunk lengths bucket as the engine's prefill pads them: four buckets an octave.
CHUNK_PER_OCTAVE = 4


def chunk_buckets(max_tokens: int) -> list[int]:
    """Every padded length of a prefill chunk of 1..max_tokens tokens."""
    return sorted({bucket_length(n, 16, per_octave=CHUNK_PER_OCTAVE) for n in range(1, max_tokens + 1)})


def row_buckets(max_rows: int) -> list[int]:
    """Every row count of a decode loop (`batch.padded_rows`)."""
    return sorted({batch.padded_rows(n, max_rows) for n in range(1, max_rows + 1)})


def mixed_row_buckets(max_rows: int) -> list[int]:
    """Every row count of a mixed step (`batch.mixed_rows`)."""
    return sorted({batch.mixed_rows(n, max_rows) for n in range(1, max_rows + 1)})


def patch_buckets(max_patches: int) -> list[int]:
    """Every patch bucket of a vision call of up to max_patches patches."""
    top = vision_bucket(max_patches)
    out, n = [], 1
    while True:
        b = vision_bucket(n)
        if b > top:
            return out
        out.append(b)
        n = b + 1


def decode_steps(engine, flags) -> int:
    """The steps of one decode loop under these flags: one with a constrained row, whose next mask
    the host computes from the token just chosen (`Engine._decode`), else the engine's decode_steps."""
    return 1 if flags.constrained else engine.decode_steps


def _rows(n: int, flags, words: int):
    """n idle rows; under flags.constrained with an all-ones mask (`Rows.allow` is then an input of
    the program, so it must be there for the warm-up to compile the program a request runs)."""
    rows = batch.rows([], n)
    if flags.constrained:
        rows = rows._replace(allow=np.full((n, words), -1, np.int32))
    return rows


def plan(engine, flag_sets, vision_patches: int = 0) -> list[tuple]:
    """The programs `run` compiles: ("mixed", flags, (t, rows)) (or under the Pallas kernel
    ("prefill", flags, t)), ("decode", flags, rows), with speculation ("verify", flags, rows), ("vision", patches)."""
    out = []
    for flags in flag_sets:
        if engine._pallas:
            out += [("prefill", flags, t) for t in chunk_buckets(engine.max_num_batched_tokens)]
        else:
            out += [("mixed", flags, (t, s)) for t in chunk_buckets(engine.max_num_batched_tokens)
                    for s in mixed_row_buckets(engine.max_num_seqs)]
        out += [("decode", flags, s) for s in row_buckets(engine.max_num_seqs)]
        if engine._spec is not None and speculative.unsupported(flags) is None:
            out += [("verify", flags, s) for s in row_buckets(engine.max_num_seqs)]
    if vision_patches:
        out += [("vision", p) for p in patch_buckets(vision_patches)]
    return out


def run(engine, programs: list[tuple], progress=None) -> float:
    """Runs each program of `plan` once on idle inputs; progress(i, n, program) before each; stops
    early once the engine is closing. Returns the seconds taken. Call from the engine's own thread or before it starts (the steps
    donate the engine's pools)."""
    t0 = time.perf_counter()
    cfg = engine.cfg
    width = engine.max_blocks_per_seq * engine.block_size
    for i, prog in enumerate(programs):
        if engine._closed:  # closing (a server's SIGTERM): stop at the next program, not after them all
            break
        if progress is not None:
            progress(i, len(programs), prog)
        if prog[0] == "vision":
            p = prog[1]
            vc = cfg.vision
            m = vc.spatial_merge_size
            vis = vision_mod.VisionInputs.build(np.zeros((p, vc.patch_dim), np.float32), np.array([[1, m, p // m]]),
                                                vc, p)
            # Waited for: its outputs are not the pools, and a tower still running when warm-up
            # returns would delay the first request (at 2B widths in float32, ~10 s of the buckets').
            jax.block_until_ready(vision_tower(*engine.params, vis))
            continue
        kind, flags, n = prog
        if kind == "verify":  # the speculative decode loop (`speculative_runs.EngineSpeculation`)
            engine._spec.warm_up(flags, n)
            continue
        t, s = n if kind == "mixed" else (n, 0)
        words = structured.mask_words(cfg.text.vocab_size)
        ids, positions, valid = np.zeros((1, t), np.int32), np.zeros((3, 1, t), np.int32), np.zeros((1, t), bool)
        if kind == "prefill":  # a chunk alone (the Pallas kernel's path)
            table = np.full((1, engine.max_blocks_per_seq), TRASH_BLOCK, np.int32)
            cache = engine._cache(table, 1)
            cache, engine._seen, engine._counts, _, _ = steps.prefill(
                *engine.params, flags, width, False, cache, engine._seen, engine._counts, ids, positions, valid,
                np.zeros(1, np.int32), np.zeros(1, np.int32), engine._text_vision(t), _rows(1, flags, words),
                np.zeros(1, bool), mesh=engine.mesh)
        elif kind == "mixed":  # chunks and decode rows, s rows in all (`Engine._mixed`)
            table = np.full((s, engine.max_blocks_per_seq), TRASH_BLOCK, np.int32)
            cache = engine._cache(table, 1)
            cache, engine._seen, engine._counts, _ = steps.mixed(
                *engine.params, flags, width, cache, engine._seen, engine._counts, ids, positions, valid,
                np.zeros((1, t), np.int32), np.zeros((1, t), np.int32), np.zeros(s + 1, np.int32), np.zeros(s, np.int32),
                engine._text_vision(t, s), np.zeros(s, bool), np.zeros(s, np.int32), np.zeros(s, bool),
                _rows(s, flags, words), engine._bucket(1), mesh=engine.mesh)
        else:
            rows = _rows(n, flags, words)
            table = np.full((n, engine.max_blocks_per_seq), TRASH_BLOCK, np.int32)
            cache = engine._cache(table, 1, engine._window_buffers(n))
            cache, engine._seen, engine._counts, _ = steps.decode(
                *engine.params, flags, width, decode_steps(engine, flags), False, cache, engine._seen, engine._counts,
                np.zeros(n, np.int32), np.zeros(n, bool), rows, mesh=engine.mesh)
            if cache.windows:
                engine._windows = (n, cache.windows)
        engine._pages = cache.pages
    engine._pages[0][0].block_until_ready()
    return time.perf_counter() - t0
