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
    # A mixed step's rows (its prefilling and decoding requests, one a slot): 8, or every slot beyond.
    assert warmup.mixed_row_buckets(4) == [4] and warmup.mixed_row_buckets(32) == [8, 32]
    assert warmup.mixed_row_buckets(1) == [1] and warmup.mixed_row_buckets(8) == [8]
    assert warmup.patch_buckets(100) == [64, 80, 96, 112]


def test_nothing_compiles_after_warm_up(setup):
    hf, m = setup
    # 10 slots: a mixed step's rows are 8, or 10 with more than 8 requests in it (both compiled).
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


def test_constrained_requests_compile_nothing_after_warm_up():
    """The server's warm-up of a constrained sampler (`serving.app._warm_up`: a structured entry in
    `sampling`) compiles what structured outputs run: the mixed steps with the allowed-token mask,
    and the decode loop of one step. After it, constrained requests (greedy and sampled, a prompt of
    one chunk and one of three, alone and batched with an unconstrained one) compile no new step,
    and their answers follow their grammars."""
    import re

    import qvl_jax
    from qvl_jax.processing.processor import Processor

    m = qvl_jax.load("tiny-random")
    proc = Processor.from_pretrained(m.path)
    eng = m.engine(max_num_seqs=2, max_model_len=160, block_size=4, num_blocks=120, decode_steps=4,
                   max_num_batched_tokens=32)
    eos = sorted(proc.eos_token_ids)
    constrained = {"temperature": 1.0, "structured": {"json_object": True}, "stop_token_ids": eos}
    seen = []
    eng.warm_up(sampling=({"temperature": 0}, constrained), progress=lambda i, n, prog: seen.append(prog))
    # 5 chunk buckets x 1 mixed row count + 2 decode row counts, for each of the two samplers.
    assert len(seen) == 14 and sum(p[1].constrained for p in seen) == 7
    compiled = (steps.mixed._cache_size(), steps.decode._cache_size(), steps.prefill._cache_size())

    def prompt(text):
        inp = proc.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True, return_tensors="np")
        return {"input_ids": inp["input_ids"]}

    short, long = prompt("Name a colour."), prompt("Describe the sea in detail, " * 7)
    assert short["input_ids"].shape[1] <= 32 < 64 < long["input_ids"].shape[1] <= 96
    regex = {"regex": "[a-z]{3,6}"}
    jobs = [(short, {"temperature": 0, "structured": regex}),
            (long, {"temperature": 1.0, "seed": 5, "structured": {"choice": ["red", "green", "blue"]}}),
            (short, {"temperature": 0})]
    for batched in (False, True):
        handles = []
        for inp, kw in jobs:
            handles.append(eng.submit(inp, max_new_tokens=8, stop_token_ids=eos, **kw))
            if not batched:
                handles[-1].result(timeout=300)
        outs = [h.result(timeout=300) for h in handles]
        texts = [proc.decode([t for t in o.tokens.tolist() if t not in eos]) for o in outs]
        assert re.fullmatch("[a-z]{3,6}", texts[0]) and texts[1] in ("red", "green", "blue"), texts
    assert (steps.mixed._cache_size(), steps.decode._cache_size(), steps.prefill._cache_size()) == compiled
    eng.close()
