"""Prompt-lookup speculative decoding: greedy output equals plain greedy output token for token (text,
image, video, a padded batch; the static path and the engine, speculative and plain requests in one
engine batch), with proposals accepted and rejected (the counts equal a host replay of the
proposer over the plain answer), within budgets and stop ids; sampling keeps its distribution (a
wrong acceptance rule fails the same check); bad configs and settings are refused in one line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm_inputs import TEXT_VOCAB, PromptBuilder, batch_inputs
from qvl_jax import InputError
from qvl_jax.engine.speculative import SpeculativeConfig, propose, propose_host
from serve_util import free_port

MODEL = "untied"  # its greedy tokens vary from step to step
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
N = 24  # new tokens: prompts below stay in one 64-entry window, so the static path compiles little


@pytest.fixture(scope="module")
def m(jax_model):
    return jax_model(MODEL)


def _dim(m) -> int:
    return m.config.vision.patch_dim


def _inputs(m, kind: str, seed: int = 0) -> dict:
    rng = np.random.RandomState(seed)
    pattern = list(rng.randint(0, TEXT_VOCAB, size=4))
    builders = {
        "text": [PromptBuilder(rng).text(11)],
        "copy": [PromptBuilder(rng)],
        "image": [PromptBuilder(rng).text(4).image(4, 4).text(5)],
        "video": [PromptBuilder(rng).text(2).video(2, 4, 4).text(3)],
        "padded_batch": [PromptBuilder(rng).text(3).image(4, 4).text(2), PromptBuilder(rng).text(12),
                         PromptBuilder(rng)],
    }[kind]
    if kind in ("copy", "padded_batch"):  # a repeated pattern: the answer tends to copy it
        builders[-1].ids += pattern * 5
    inp = batch_inputs(builders, _dim(m), rng)
    if len(builders) == 1:
        inp.pop("attention_mask")
    return inp


def _replay(prompt: list[int], answer: list[int], spec: SpeculativeConfig, max_new: int):
    """(proposed, accepted, index of the first rejected proposal's step or None): the verify steps
    a greedy speculative run of this answer makes, replayed on the host (no stop ids; the window
    never binds)."""
    proposed = accepted = 0
    first_reject = None
    i = 1  # answer[0] comes from the prefill
    while i < len(answer):
        draft = propose_host(prompt + answer[:i], spec)[:max_new - i - 1]
        a = 0
        while a < len(draft) and i + a < len(answer) and draft[a] == answer[i + a]:
            a += 1
        if a < len(draft) and first_reject is None:
            first_reject = i
        proposed += len(draft)
        accepted += a
        i += a + 1
    return proposed, accepted, first_reject


# ---------------------------------------------------------------------------------------------
# Config and proposer


@pytest.mark.parametrize("value, match", [
    ({"method": "eagle", "num_speculative_tokens": 2}, r'method must be "ngram"'),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, r"unknown speculative_config key\(s\): lookahead"),
    ({"method": "ngram"}, r"needs num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, r"num_speculative_tokens must be an integer in \[1, 16\]"),
    ({"method": "ngram", "num_speculative_tokens": True}, r"num_speculative_tokens must be an integer"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, r"prompt_lookup_min must be"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2, "prompt_lookup_min": 3},
     r"prompt_lookup_min \(3\) must be <= prompt_lookup_max \(2\)"),
    ("ngram", r"speculative_config must be a dict"),
])
def test_bad_config_refused_in_one_line(m, value, match):
    with pytest.raises(InputError, match=match) as e:
        SpeculativeConfig.of(value)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=match):
        m.generate(input_ids=np.arange(10, 20)[None], max_new_tokens=2, speculative_config=value)


def test_config_defaults_as_vllm():
    assert SpeculativeConfig.of({"num_speculative_tokens": 4}) == SpeculativeConfig(4, 5, 5)
    assert SpeculativeConfig.of({"num_speculative_tokens": 4, "prompt_lookup_max": 3}) == SpeculativeConfig(4, 3, 3)
    assert SpeculativeConfig.of({"num_speculative_tokens": 4, "prompt_lookup_min": 2}) == SpeculativeConfig(4, 2, 2)


@pytest.mark.parametrize("kw, match", [
    (dict(repetition_penalty=1.2), "penalties"), (dict(presence_penalty=0.5), "penalties"),
    (dict(return_logprobs=True), "logprobs"), (dict(return_logits=True), "return_logits"),
])
def test_unsupported_settings_refused(m, kw, match):
    with pytest.raises(InputError, match=f"speculative decoding does not combine with .*{match}"):
        m.generate(input_ids=np.arange(10, 20)[None], max_new_tokens=2, speculative_config=SPEC, **kw)


def test_pallas_engine_refused(m):
    with pytest.raises(InputError, match="attention='pallas'"):
        m.engine(max_num_seqs=2, max_model_len=64, attention="pallas", speculative_config=SPEC)


def test_proposer_equals_host_reference():
    """The device search (longest n-gram first, earliest match, up to k tokens, left padding never
    matched) against the plain host one, on short sequences over 3 symbols (many matches)."""
    assert propose_host([1, 2, 3, 4, 1, 2], SpeculativeConfig(2, 2, 1)) == [3, 4]
    assert propose_host([5, 1, 7, 1, 8, 1], SpeculativeConfig(3, 2, 1)) == [7, 1, 8]  # earliest of the 1-grams
    assert propose_host([1, 2, 3, 4], SpeculativeConfig(2, 2, 1)) == []
    rng = np.random.RandomState(0)
    for _ in range(20):
        n_max = int(rng.randint(1, 5))
        spec = SpeculativeConfig(int(rng.randint(1, 6)), n_max, int(rng.randint(1, n_max + 1)))
        hist = np.full((8, 40), -1, np.int32)
        seq, lo, toks = np.zeros(8, np.int32), np.zeros(8, np.int32), []
        for i in range(8):
            n, pad = rng.randint(1, 30), rng.randint(0, 5)
            toks.append(rng.randint(0, 3, n).tolist())
            hist[i, pad:pad + n], lo[i], seq[i] = toks[-1], pad, pad + n - 1
        draft, n_draft = jax.device_get(propose(jnp.asarray(hist), jnp.asarray(seq), jnp.asarray(lo), spec))
        for i in range(8):
            assert draft[i, :n_draft[i]].tolist() == propose_host(toks[i], spec), (toks[i], spec)


# ---------------------------------------------------------------------------------------------
# The static path


def _both(m, inp, n=N, spec=SPEC, **kw):
    kw.setdefault("stop_token_ids", [])
    plain = m.generate(**inp, max_new_tokens=n, **kw)
    fast = m.generate(**inp, max_new_tokens=n, speculative_config=spec, **kw)
    return plain, fast


@pytest.mark.parametrize("kind", ["text", "image", "video", "padded_batch"])
def test_greedy_equals_plain(m, kind):
    plain, fast = _both(m, _inputs(m, kind))
    np.testing.assert_array_equal(fast.lengths, plain.lengths)
    np.testing.assert_array_equal(fast.tokens, plain.tokens)
    assert plain.proposed_tokens is None and fast.proposed_tokens.shape == (len(plain.tokens),)


def test_copy_prompt_accepts_and_rejects(m):
    """A repeated pattern: proposals are accepted, others rejected early on (rolled back), and the
    answer is still the plain one; the counts are those of a host replay of the verify steps."""
    inp = _inputs(m, "copy")
    plain, fast = _both(m, inp, n=40)
    np.testing.assert_array_equal(fast.tokens, plain.tokens)
    spec = SpeculativeConfig.of(SPEC)
    proposed, accepted, first_reject = _replay(inp["input_ids"][0].tolist(), plain.tokens[0].tolist(), spec, 40)
    assert (int(fast.proposed_tokens[0]), int(fast.accepted_tokens[0])) == (proposed, accepted)
    assert accepted > 0 and proposed > accepted
    assert first_reject is not None and first_reject < 30  # tokens after a rollback were checked
    streamed = np.stack(list(m.stream(**inp, max_new_tokens=40, stop_token_ids=[], speculative_config=SPEC)), 1)
    np.testing.assert_array_equal(streamed, plain.tokens)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_budget_never_exceeded(m, n):
    inp = _inputs(m, "padded_batch")
    plain, fast = _both(m, inp, n=n)
    assert fast.tokens.shape == plain.tokens.shape == (3, n)
    np.testing.assert_array_equal(fast.tokens, plain.tokens)


def test_stop_ids_end_rows_as_plain(m):
    inp = _inputs(m, "padded_batch")
    ref, _ = _both(m, inp)
    stop = [int(ref.tokens[0, 6]), int(ref.tokens[2, 9])]  # met inside accepted runs or as bonus tokens
    plain, fast = _both(m, inp, stop_token_ids=stop)
    assert (plain.lengths < N).any()
    np.testing.assert_array_equal(fast.lengths, plain.lengths)
    np.testing.assert_array_equal(fast.tokens, plain.tokens)


def test_sampling_same_tokens_per_seed(m):
    """The acceptance rule is realised with the draws plain sampling makes: same seed, same tokens."""
    inp = _inputs(m, "padded_batch")
    plain, fast = _both(m, inp, temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=1)
    np.testing.assert_array_equal(fast.tokens, plain.tokens)


def test_non_finite_logits_reported_as_plain(m):
    """A NaN embedding row for a token the answer feeds: NaN logits from the step after it, the
    same error (row and token index) with and without speculation."""
    from flax import nnx

    from qvl_jax import Model, NumericalError

    inp = _inputs(m, "copy")
    ref, _ = _both(m, inp)
    module = nnx.clone(m.module)
    emb = module.model.language_model.embed_tokens.weight
    emb.set_value(emb[...].at[int(ref.tokens[0, 4])].set(np.nan))
    broken = Model.from_module(module)
    msgs = []
    for spec in (None, SPEC):
        with pytest.raises(NumericalError) as e:
            broken.generate(**inp, max_new_tokens=N, stop_token_ids=[], speculative_config=spec)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] and "batch row 0" in msgs[0]


# ---------------------------------------------------------------------------------------------
# The sampling distribution


def _lookup_prompt(m, rng) -> dict:
    """A prompt holding each of the 3 most likely first tokens, each followed by a random one: under
    top_k=3 the first token always has a 1-gram match, so the next step always verifies a proposal."""
    p = rng.randint(0, TEXT_VOCAB, size=8).tolist()
    for _ in range(10):
        miss = [t for t in np.argsort(m.logits(np.array([p]))[0, -1])[-3:].tolist() if t not in p]
        if not miss:
            return {"input_ids": np.array([p])}
        p = [x for t in miss for x in (t, int(rng.randint(0, TEXT_VOCAB)))] + p
    raise AssertionError("no prompt holding its own likely first tokens")


def _first_tokens(m, inp, rows: int, seed: int, spec) -> np.ndarray:
    batch = {k: np.repeat(v, rows, axis=0) for k, v in inp.items()}  # row r draws with fold_in(key(seed), r)
    return m.generate(**batch, max_new_tokens=3, stop_token_ids=[], temperature=1.0, top_k=3, seed=seed,
                      speculative_config=spec).tokens


def _tv(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance between the empirical joint distributions of two samples' rows."""
    keys = sorted({tuple(r) for r in a} | {tuple(r) for r in b})
    ca = {k: 0 for k in keys}
    cb = dict(ca)
    for r in a:
        ca[tuple(r)] += 1
    for r in b:
        cb[tuple(r)] += 1
    return 0.5 * sum(abs(ca[k] / len(a) - cb[k] / len(b)) for k in keys)


# Two independent samples of 512 of the first 3 tokens (27 outcomes) from one distribution: 0.11 to
# 0.16 apart here (seeds 0-2 against each other and against speculation); a rule that accepts every
# proposal: 1.0.
TV_BOUND = 0.3


def test_sampling_distribution_kept(m):
    """Over 512 rows (independent PRNG streams), temperature 1 and top_k=3, the joint distribution
    of the first 3 tokens with speculation is within TV_BOUND of plain sampling's under another
    seed (under the same seed the tokens are equal: `test_sampling_same_tokens_per_seed`); the
    same check fails for a rule that accepts every proposal."""
    inp = _lookup_prompt(m, np.random.RandomState(0))
    plain = _first_tokens(m, inp, 512, 0, None)
    fast = _first_tokens(m, inp, 512, 5, SPEC)
    assert _tv(plain, fast) < TV_BOUND
    wrong = _first_tokens(m, inp, 512, 5, dataclasses.replace(SpeculativeConfig.of(SPEC), _rule="always"))
    assert _tv(plain, wrong) > TV_BOUND


# ---------------------------------------------------------------------------------------------
# The engine


def _alone(m, inp, n, **kw):
    out = m.generate(**inp, max_new_tokens=n, stop_token_ids=kw.pop("stop_token_ids", []), **kw)
    return out.tokens[0, :out.lengths[0]]


@pytest.fixture(scope="module")
def eng(m):
    e = m.engine(max_num_seqs=4, max_model_len=128, block_size=4, num_blocks=120, decode_steps=4,
                 max_num_batched_tokens=64, speculative_config=SPEC)
    yield e
    e.close()


def _settle(eng, start: int) -> int:
    for _ in range(100):
        if eng.num_free_blocks == start:
            break
        time.sleep(0.05)
    return eng.num_free_blocks


def test_engine_mixed_batch_equals_alone(m, eng):
    """Speculative requests (greedy copy prompt, image, video, sampled) batched with one whose
    settings speculation does not serve (logprobs: decoded plainly), each equal to model.generate
    alone; a follow-up prompt holding the copy answer hits the prefix cache over blocks of accepted
    tokens and still answers as alone; every block comes back."""
    start = eng.num_free_blocks
    stats = dict(eng.stats)
    copy = _inputs(m, "copy")
    cases = [(copy, {}), (_inputs(m, "image"), {}), (_inputs(m, "video"), {}),
             (copy, dict(temperature=0.8, top_k=5, seed=3)), (copy, dict(logprobs=2))]
    handles = [eng.submit(inp, max_new_tokens=N, stop_token_ids=[], **kw) for inp, kw in cases]
    outs = [h.result(timeout=900) for h in handles]
    for out, (inp, kw) in zip(outs, cases):
        kw = {k: v for k, v in kw.items() if k != "logprobs"}
        np.testing.assert_array_equal(out.tokens, _alone(m, inp, N, **kw))
    assert outs[0].accepted_tokens > 0 and outs[0].proposed_tokens > outs[0].accepted_tokens
    assert outs[4].proposed_tokens == 0 and len(outs[4].logprobs) == N  # decoded plainly
    for key, field in (("spec_decode_num_draft_tokens", "proposed_tokens"),
                       ("spec_decode_num_accepted_tokens", "accepted_tokens")):
        assert eng.stats[key] - stats.get(key, 0) == sum(getattr(o, field) for o in outs)
    # The conversation goes on: its prompt holds the copy answer (blocks filled by verify steps).
    ids = np.concatenate([copy["input_ids"][0], outs[0].tokens[:-1], [5, 6, 7]])[None]
    follow = eng.submit({"input_ids": ids}, max_new_tokens=8, stop_token_ids=[]).result(timeout=900)
    assert follow.cached_tokens > copy["input_ids"].shape[1]
    np.testing.assert_array_equal(follow.tokens, _alone(m, {"input_ids": ids}, 8))
    assert _settle(eng, start) == start


def test_engine_stop_id_and_budget(m, eng):
    copy = _inputs(m, "copy")
    ref = _alone(m, copy, N)
    stop = [int(ref[7])]
    got = eng.submit(copy, max_new_tokens=N, stop_token_ids=stop).result(timeout=900)
    assert got.finish_reason == "stop"
    np.testing.assert_array_equal(got.tokens, _alone(m, copy, N, stop_token_ids=stop))
    for n in (1, 3):
        got = eng.submit(copy, max_new_tokens=n, stop_token_ids=[]).result(timeout=900)
        assert got.finish_reason == "length"
        np.testing.assert_array_equal(got.tokens, ref[:n])


# ---------------------------------------------------------------------------------------------
# The server


def test_serve_speculative_config_and_metrics(tmp_path):
    """`qvl-jax serve --speculative-config`: a copy-heavy completion answers as model.generate does,
    and /metrics counts the proposals and accepted ones; a bad config fails at start in one line."""
    from prometheus_client.parser import text_string_to_metric_families

    import qvl_jax

    bad = subprocess.run([sys.executable, "-m", "qvl_jax", "serve", "--speculative-config", '{"method": "eagle"}'],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and 'method must be "ngram"' in bad.stderr
    port = free_port()
    env = dict(os.environ, QVL_JAX_CACHE=os.environ["QVL_JAX_CACHE"])
    p = subprocess.Popen([sys.executable, "-m", "qvl_jax", "serve", "--port", str(port), "--warm-up", "requests",
                          "--max-num-seqs", "2", "--max-model-len", "256", "--speculative-config", json.dumps(SPEC)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 300
        while time.monotonic() < end:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert p.poll() is None, "the server exited"
            time.sleep(0.2)
        ids = ([11, 22, 33, 44] * 6)
        r = httpx.post(base + "/v1/completions", json={"model": "tiny-random", "prompt": ids, "max_tokens": 20,
                                                       "temperature": 0, "ignore_eos": True}, timeout=300)
        assert r.status_code == 200, r.text
        model = qvl_jax.load("tiny-random")
        want = model.generate(input_ids=np.array([ids]), max_new_tokens=20, stop_token_ids=[])
        assert r.json()["usage"]["completion_tokens"] == 20
        fams = {f.name: f.samples[0].value for f in text_string_to_metric_families(httpx.get(base + "/metrics").text)
                if f.samples}
        assert fams["qvl_engine_spec_decode_num_draft_tokens"] >= fams["qvl_engine_spec_decode_num_accepted_tokens"] > 0
        from qvl_jax.processing.processor import Processor

        proc = Processor.from_pretrained("tiny-random")
        assert r.json()["choices"][0]["text"] == proc.decode(want.tokens[0].tolist(), skip_special_tokens=True)
    finally:
        p.terminate()
        p.wait(timeout=60)
