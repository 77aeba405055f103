"""`Engine.warm_up` compiles every prefill and decode program the engine's settings allow: after it,
requests of any length, with and without images, at any concurrency, compile no new step (the
window is a traced bucket index, a chunk's vision input is shaped by its length alone), and their
answers still equal model.generate's."""

from __future__ import annotations

import numpy as np
import pytest

from mm_inputs import PromptBuilder
from qvl_jax import InputError
from qvl_jax.engine import steps, warmup
from test_engine import MODEL, _check, _one


@pytest.fixture(scope="module")
def setup(hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint(MODEL)
    return hf, jax_model(MODEL)


def test_buckets():
    assert warmup.chunk_buckets(64) == [16, 20, 24, 28, 32, 40, 48, 56, 64]
    assert warmup.row_buckets(6) == [1, 2, 4, 6]
    assert warmup.row_buckets(8) == [1, 2, 4, 8]
    assert warmup.mixed_row_buckets(4) == [4] and warmup.mixed_row_buckets(32) == [8, 32]
    assert warmup.patch_buckets(100) == [64, 80, 96, 112]


def test_nothing_compiles_after_warm_up(setup):
    hf, m = setup
    # 10 slots: a mixed step's decode rows are 8, or 10 with more than 8 decoding (both compiled).
    eng = m.engine(max_num_seqs=10, max_model_len=128, block_size=4, num_blocks=400, decode_steps=4,
                   max_num_batched_tokens=32)
    seen = []
    secs = eng.warm_up(sampling=({"temperature": 0},), vision_patches=64,
                       progress=lambda i, n, prog: seen.append((i, n, prog[0])))
    assert secs > 0 and [s[0] for s in seen] == list(range(len(seen))) and {s[2] for s in seen} == {
        "mixed", "decode", "vision"}
    compiled = (steps.mixed._cache_size(), steps.decode._cache_size(), steps.prefill._cache_size())
    rng = np.random.RandomState(3)
    cases = [(PromptBuilder(rng).text(5), 9), (PromptBuilder(rng).text(70), 5),
             (PromptBuilder(rng).text(4).image(4, 4).text(3), 7), (PromptBuilder(rng).image(8, 4).text(40), 11),
             (PromptBuilder(rng).text(17), 3)] + [(PromptBuilder(rng).text(6 + 9 * i), 12) for i in range(6)]
    inputs = [(_one(b, hf, rng), n) for b, n in cases]
    handles = [eng.submit(inp, max_new_tokens=n, stop_token_ids=[], temperature=0) for inp, n in inputs]
    outs = [h.result(timeout=300) for h in handles]
    # One at a time too (a decode loop of one row), and a long prompt over several chunks and windows.
    outs.append(eng.submit(inputs[1][0], max_new_tokens=40, stop_token_ids=[], temperature=0).result(timeout=300))
    assert (steps.mixed._cache_size(), steps.decode._cache_size(), steps.prefill._cache_size()) == compiled
    eng.close()
    for (inp, n), out in zip(inputs + [(inputs[1][0], 40)], outs):
        _check(m, inp, out, n)


def test_warm_up_errors(setup):
    _, m = setup
    eng = m.engine(max_num_seqs=2, max_model_len=64, block_size=4, num_blocks=40, max_num_batched_tokens=16)
    with pytest.raises(InputError, match="vision_patches"):
        eng.warm_up(vision_patches=-1)
    with pytest.raises(InputError, match="temperature"):
        eng.warm_up(sampling=({"temperature": -1},))
    eng.close()


def test_close_stops_a_warm_up_between_programs(setup):
    """A server stopped (SIGTERM) during its warm-up closes its engine: the warm-up ends at the next
    program instead of compiling the rest first."""
    import threading

    _, m = setup
    eng = m.engine(max_num_seqs=2, max_model_len=64, block_size=4, num_blocks=40, max_num_batched_tokens=64)
    started, seen = threading.Event(), []

    def progress(i, n, prog):
        seen.append(i)
        if i == 0:
            started.set()
            threading.Thread(target=eng.close).start()
            while not eng._closed:
                pass

    eng.warm_up(progress=progress)
    assert started.is_set() and seen == [0]
