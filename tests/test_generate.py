"""Generation: greedy tokens against transformers' generate, cached decode against the full
forward, sampling semantics, batching, streaming, multi-turn cache reuse and compile counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mm_inputs import PromptBuilder, batch_inputs, patch_dim
from parity import LOGITS_RTOL, rel_err
from qvl_jax import InputError
from qvl_jax.engine import generate as gen_mod, sampling, steps
from qvl_jax.modeling import inputs as modeling_inputs
from qvl_jax.modeling import model as modeling_model

N_NEW = 24
TIE_MARGIN = 1e-4  # below this top-2 margin in HF's logits a greedy mismatch is a tie, not a bug


def _hf_generate(hf, inp: dict, n=N_NEW, **kw):
    kwargs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inp.items()}
    with torch.no_grad():
        out = hf.generate(**kwargs, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True, **kw)
    t = inp["input_ids"].shape[1]
    return out.sequences[:, t:].numpy(), torch.stack(out.logits, 1).numpy()


def _assert_same_greedy(ours: np.ndarray, ref: np.ndarray, ref_logits: np.ndarray):
    """Equal tokens; a first difference is allowed only where HF's top-2 margin says it is a tie."""
    for row in range(len(ref)):
        diff = np.flatnonzero(ours[row] != ref[row])
        if diff.size:
            i = diff[0]
            top2 = np.sort(ref_logits[row, i])[-2:]
            assert top2[1] - top2[0] < TIE_MARGIN, f"row {row} differs at step {i} (margin {top2[1] - top2[0]})"


def _prompt(hf, kind, seed=0):
    rng = np.random.RandomState(seed)
    builders = {
        "text": [PromptBuilder(rng).text(11)],
        "image": [PromptBuilder(rng).text(4).image(6, 8).text(5)],
        "multi_image": [PromptBuilder(rng).text(2).image(4, 4).text(3).image(2, 6).text(2).image(8, 4).text(4)],
        "video": [PromptBuilder(rng).text(3).video(3, 4, 6).text(4)],
        "padded_batch": [PromptBuilder(rng).text(3).image(4, 6).text(2),
                         PromptBuilder(rng).text(12).image(2, 2).text(6),
                         PromptBuilder(rng).text(5)],
    }[kind]
    return batch_inputs(builders, patch_dim(hf.config), rng)


@pytest.mark.parametrize("kind", ["text", "image", "multi_image", "video", "padded_batch"])
@pytest.mark.parametrize("name", ["tied", "untied"])
def test_greedy_matches_transformers(name, kind, hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint(name)
    inp = _prompt(hf, kind)
    ref, ref_logits = _hf_generate(hf, inp)
    out = jax_model(name).generate(**inp, max_new_tokens=N_NEW, stop_token_ids=[])
    assert out.tokens.shape == ref.shape and out.tokens.dtype == np.int32
    _assert_same_greedy(out.tokens, ref, ref_logits)


def test_generation_crosses_attention_window_buckets(hf_checkpoint, jax_model):
    """A decode longer than the first attention window (64 cache entries) re-enters the loop with the
    next bucket and goes on: the whole answer, greedy and streamed, equals transformers' and has
    every token asked for (a loop that stopped at the window's end would return 64 - prompt)."""
    hf, _ = hf_checkpoint("untied")
    inp = _prompt(hf, "padded_batch", seed=17)
    n = 140 - inp["input_ids"].shape[1]  # the cache holds 140 tokens: windows 64, 128, 256
    ref, ref_logits = _hf_generate(hf, inp, n=n)
    out = jax_model("untied").generate(**inp, max_new_tokens=n, stop_token_ids=[])
    assert out.tokens.shape == ref.shape and (out.lengths == n).all()
    _assert_same_greedy(out.tokens, ref, ref_logits)
    streamed = np.stack(list(jax_model("untied").stream(**inp, max_new_tokens=n, stop_token_ids=[])), 1)
    np.testing.assert_array_equal(streamed, out.tokens)


def _full_forward(m, inp, out):
    """Our full (uncached) forward over prompt + fed tokens, with decode positions index + rope_delta:
    the logits each decode step must reproduce."""
    prep = modeling_inputs.prepare_inputs(m.config, **inp)
    b, t = prep.input_ids.shape
    n = out.tokens.shape[1]
    fed = out.tokens[:, : n - 1]
    ids = np.concatenate([prep.input_ids, fed], 1)
    real = prep.mask.sum(1)
    dec = (real[:, None] + np.arange(n - 1)[None] + prep.rope_delta[:, None]).astype(np.int32)
    positions = np.concatenate([prep.positions, np.broadcast_to(dec[None], (3, b, n - 1))], 2)
    valid = np.concatenate([prep.mask, np.ones((b, n - 1), np.int32)], 1) > 0
    vision = None
    if prep.vision is not None:
        feats, ds = modeling_model.vision_tower(*m.split, prep.vision)
        index = np.concatenate([prep.feat_index, np.full((b, n - 1), -1, np.int32)], 1)
        vision = (feats, ds, jnp.asarray(index))
    logits = np.asarray(modeling_model.forward_logits(*m.split, jnp.asarray(ids), jnp.asarray(positions),
                                                      jnp.asarray(valid), vision))
    return logits[:, t - 1:]  # the logits that chose each new token


@pytest.mark.parametrize("kind", ["text", "image", "video", "padded_batch"])
def test_cached_decode_equals_full_forward(kind, hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("untied")
    m = jax_model("untied")
    inp = _prompt(hf, kind, seed=1)
    # right padding in the input: generate re-pads to the left, the reference sees it as given
    out = m.generate(**inp, max_new_tokens=20, stop_token_ids=[], return_logits=True)
    full = _full_forward(m, inp, out)
    assert rel_err(out.logits, full) <= 1e-5


def test_rope_delta_matters(hf_checkpoint, jax_model, monkeypatch):
    """Decoding without rope_delta (positions = cache index) must break the image case."""
    hf, _ = hf_checkpoint("untied")
    inp = _prompt(hf, "image", seed=2)
    ref, ref_logits = _hf_generate(hf, inp, n=12)
    orig = gen_mod.Generator.request

    def no_delta(self, inputs):
        r = orig(self, inputs)
        return gen_mod.Request(**{**r.__dict__, "delta": np.zeros_like(r.delta)})
    monkeypatch.setattr(gen_mod.Generator, "request", no_delta)
    out = jax_model("untied").generate(**inp, max_new_tokens=12, stop_token_ids=[], return_logits=True)
    assert rel_err(out.logits[:, 1:], ref_logits[:, 1:]) > LOGITS_RTOL


def test_batched_rows_equal_alone(hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("tied")
    m = jax_model("tied")
    rng = np.random.RandomState(4)
    builders = [PromptBuilder(rng).text(3).image(4, 6).text(2), PromptBuilder(rng).text(9).image(6, 2).text(3),
                PromptBuilder(rng).text(4)]
    both = batch_inputs(builders, patch_dim(hf.config), np.random.RandomState(5), pad_side="right")
    out = m.generate(**both, max_new_tokens=16, stop_token_ids=[], return_logits=True)
    at = 0
    for row, b in enumerate(builders):
        grids = both["image_grid_thw"][at:at + len(b.image_grids)] if b.image_grids else None
        start = int(np.prod(both["image_grid_thw"][:at], -1).sum()) if at else 0
        n_p = int(np.prod(grids, -1).sum()) if grids is not None else 0
        kw = {} if grids is None else {"pixel_values": both["pixel_values"][start:start + n_p], "image_grid_thw": grids}
        alone = m.generate(input_ids=np.array([b.ids]), max_new_tokens=16, stop_token_ids=[], return_logits=True, **kw)
        at += len(b.image_grids)
        assert rel_err(out.logits[row], alone.logits[0]) <= 1e-5
        _assert_same_greedy(out.tokens[row:row + 1], alone.tokens, alone.logits)


def test_stop_tokens_and_padding(jax_model):
    m = jax_model("tied")
    ids = np.random.RandomState(6).randint(0, 290, size=(2, 7))
    free = m.generate(input_ids=ids, max_new_tokens=12, stop_token_ids=[])
    stop = int(free.tokens[0, 3])
    out = m.generate(input_ids=ids, max_new_tokens=12, stop_token_ids=[stop], pad_token_id=5)
    first = int(np.flatnonzero(free.tokens[0] == stop)[0])
    assert out.lengths[0] == first + 1
    np.testing.assert_array_equal(out.tokens[0, : first + 1], free.tokens[0, : first + 1])
    assert (out.tokens[0, first + 1:] == 5).all()
    if stop not in free.tokens[1]:
        np.testing.assert_array_equal(out.tokens[1], free.tokens[1])
        assert out.lengths[1] == 12


def test_max_new_tokens_one(jax_model):
    m = jax_model("tied")
    ids = np.arange(10, 20)[None]
    out = m.generate(input_ids=ids, max_new_tokens=1, stop_token_ids=[], return_logits=True)
    assert out.tokens.shape == (1, 1)
    np.testing.assert_allclose(out.logits[0, 0], m.logits(ids)[0, -1], rtol=0, atol=1e-4)


def test_streaming_equals_loop(hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("untied")
    m = jax_model("untied")
    inp = _prompt(hf, "padded_batch", seed=7)
    out = m.generate(**inp, max_new_tokens=14, stop_token_ids=[])
    streamed = np.stack(list(m.stream(**inp, max_new_tokens=14, stop_token_ids=[])), 1)
    np.testing.assert_array_equal(streamed, out.tokens)
    kw = dict(temperature=HOT, top_p=0.9, seed=3, stop_token_ids=[])
    np.testing.assert_array_equal(np.stack(list(m.stream(**inp, max_new_tokens=10, **kw)), 1),
                                  m.generate(**inp, max_new_tokens=10, **kw).tokens)


# --- sampling ---

def processed_logits_reference(logits: np.ndarray, prompt_and_output: list[list[int]], output: list[list[int]],
                               temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                               frequency_penalty=0.0, presence_penalty=0.0) -> np.ndarray:
    """Plain-numpy statement of what the sampler draws from (for tests and documentation)."""
    out = np.array(logits, np.float64)
    for row in range(out.shape[0]):
        x = out[row]
        if repetition_penalty != 1.0:
            for tok in set(prompt_and_output[row]):
                x[tok] = x[tok] / repetition_penalty if x[tok] > 0 else x[tok] * repetition_penalty
        for tok in set(output[row]):
            x[tok] -= frequency_penalty * output[row].count(tok) + presence_penalty
        x /= temperature if temperature > 0 else 1.0
        if top_k > 0:
            kth = np.sort(x)[::-1][min(top_k, len(x)) - 1]
            x[x < kth] = -np.inf
        if top_p < 1.0:
            order = np.argsort(x, kind="stable")  # ascending, as transformers
            p = np.exp(x[order] - x[order].max())
            p /= p.sum()
            remove = np.cumsum(p) <= 1 - top_p
            remove[-1] = False
            x[order[remove]] = -np.inf
        if min_p > 0:
            p = np.exp(x - x.max())
            p /= p.sum()
            x[p < min_p * p.max()] = -np.inf
        out[row] = x
    return out


# The tiny models' logits are very peaked (std-1 tied embeddings): sampling tests use a high
# temperature so that different seeds have room to differ.
HOT = 30.0


def test_seed_reproduces_and_varies(jax_model):
    m = jax_model("tied")
    ids = np.random.RandomState(8).randint(0, 290, size=(2, 6))
    a = m.generate(input_ids=ids, max_new_tokens=16, temperature=HOT, seed=1, stop_token_ids=[]).tokens
    b = m.generate(input_ids=ids, max_new_tokens=16, temperature=HOT, seed=1, stop_token_ids=[]).tokens
    c = m.generate(input_ids=ids, max_new_tokens=16, temperature=HOT, seed=2, stop_token_ids=[]).tokens
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_top_k_one_is_greedy(jax_model):
    m = jax_model("tied")
    ids = np.random.RandomState(9).randint(0, 290, size=(2, 6))
    greedy = m.generate(input_ids=ids, max_new_tokens=12, stop_token_ids=[]).tokens
    k1 = m.generate(input_ids=ids, max_new_tokens=12, temperature=1.5, top_k=1, seed=4, stop_token_ids=[]).tokens
    np.testing.assert_array_equal(greedy, k1)


def test_per_row_temperature(jax_model):
    """Row 0 greedy, row 1 sampled, in one batch."""
    m = jax_model("tied")
    ids = np.random.RandomState(10).randint(0, 290, size=(2, 6))
    greedy = m.generate(input_ids=ids, max_new_tokens=12, stop_token_ids=[]).tokens
    mixed = m.generate(input_ids=ids, max_new_tokens=12, temperature=[0.0, HOT], seed=0, stop_token_ids=[]).tokens
    np.testing.assert_array_equal(mixed[0], greedy[0])
    assert (mixed[1] != greedy[1]).any()


@pytest.mark.parametrize("kw", [
    dict(temperature=0.7), dict(temperature=1.3, top_k=5), dict(temperature=1.0, top_p=0.8),
    dict(temperature=0.8, min_p=0.1), dict(temperature=1.0, top_k=20, top_p=0.5, min_p=0.05),
    dict(repetition_penalty=1.3), dict(repetition_penalty=0.7, temperature=1.0, top_k=8),
    dict(frequency_penalty=0.5, presence_penalty=0.25, temperature=1.0),
])
def test_processed_logits_match_numpy(kw):
    rng = np.random.RandomState(11)
    b, v = 3, 50
    logits = (rng.randn(b, v) * 3).astype(np.float32)
    prompt = [list(rng.randint(0, v, 6)) for _ in range(b)]
    output = [list(rng.randint(0, v, 5)) for _ in range(b)]
    ref = processed_logits_reference(logits, [p + o for p, o in zip(prompt, output)], output, **kw)
    sp, flags = sampling.make_sampling(b, **kw)
    seen = np.zeros((b, v), bool)
    counts = np.zeros((b, v), np.int32)
    for r in range(b):
        seen[r, prompt[r] + output[r]] = True
        np.add.at(counts[r], output[r], 1)
    ours = sampling.apply_penalties(jnp.asarray(logits), sp, flags, jnp.asarray(seen), jnp.asarray(counts))
    if flags.sample:
        ours = sampling.warp(ours, sp, flags)
    ours = np.asarray(ours, np.float64)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(ours[fin], ref[fin], rtol=1e-5, atol=1e-5)


def test_first_argmax_equals_numpy_with_ties():
    rng = np.random.RandomState(5)
    x = rng.randint(-3, 4, size=(64, 37)).astype(np.float32)  # many ties
    x[3] = -np.inf
    x[4, :] = 2.0
    x[5, -1] = 100.0
    np.testing.assert_array_equal(np.asarray(sampling.first_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))


@pytest.mark.parametrize("kw", [dict(top_k=7), dict(top_p=0.7), dict(min_p=0.2), dict(temperature=0.5)])
def test_warpers_match_transformers(kw):
    from transformers.generation import logits_process as lp

    rng = np.random.RandomState(12)
    logits = (rng.randn(4, 64) * 2).astype(np.float32)
    warper = {"top_k": lambda v: lp.TopKLogitsWarper(v), "top_p": lambda v: lp.TopPLogitsWarper(v),
              "min_p": lambda v: lp.MinPLogitsWarper(v), "temperature": lambda v: lp.TemperatureLogitsWarper(v)}
    (name, value), = kw.items()
    ref = warper[name](value)(None, torch.tensor(logits)).numpy()
    sp, flags = sampling.make_sampling(4, **{"temperature": 1.0, **kw})
    ours = np.asarray(sampling.warp(jnp.asarray(logits), sp, flags))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6)


def test_repetition_penalty_matches_transformers_generate(hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("tied")
    inp = _prompt(hf, "text", seed=13)
    ref, ref_logits = _hf_generate(hf, inp, n=16, repetition_penalty=1.5)
    out = jax_model("tied").generate(**inp, max_new_tokens=16, repetition_penalty=1.5, stop_token_ids=[])
    _assert_same_greedy(out.tokens, ref, ref_logits)
    plain = jax_model("tied").generate(**inp, max_new_tokens=16, stop_token_ids=[])
    assert (plain.tokens != out.tokens).any()


def test_logprobs(jax_model):
    m = jax_model("tied")
    ids = np.arange(30, 40)[None]
    out = m.generate(input_ids=ids, max_new_tokens=6, stop_token_ids=[], return_logprobs=True, return_logits=True)
    ref = jax.nn.log_softmax(out.logits, -1)
    np.testing.assert_allclose(out.logprobs, np.take_along_axis(np.asarray(ref), out.tokens[..., None], -1)[..., 0],
                               rtol=1e-5, atol=1e-5)


# --- multi-turn cache reuse ---

def _turn(hf, rng, prev_ids, prev_out, builder_fn):
    """The next conversation: previous prompt + its answer + a new user turn."""
    b = PromptBuilder(rng)
    b.ids = list(prev_ids) + list(prev_out)
    builder_fn(b)
    return b


def test_chat_session_reuses_cache_and_equals_recompute(hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("untied")
    m = jax_model("untied")
    rng = np.random.RandomState(14)
    dim = patch_dim(hf.config)
    first = PromptBuilder(rng).text(4).image(4, 6).text(3)
    inp1 = batch_inputs([first], dim, np.random.RandomState(1))
    session = m.chat_session()
    out1 = session.generate(**inp1, max_new_tokens=8, stop_token_ids=[])
    np.testing.assert_array_equal(out1.tokens, m.generate(**inp1, max_new_tokens=8, stop_token_ids=[]).tokens)
    assert out1.reused_tokens == 0

    # turn 2: the answer, then more text and a new image
    second = PromptBuilder(rng)
    second.ids = list(first.ids) + list(out1.tokens[0])
    second.image_grids = list(first.image_grids)
    second.text(3).image(2, 4).text(2)
    pix2 = np.random.RandomState(2).uniform(-1, 1, size=(8, dim)).astype(np.float32)
    inp2 = {"input_ids": np.array([second.ids]), "pixel_values": np.concatenate([inp1["pixel_values"], pix2]),
            "image_grid_thw": np.array(second.image_grids)}
    out2 = session.generate(**inp2, max_new_tokens=10, stop_token_ids=[], return_logits=True)
    fresh = m.generate(**inp2, max_new_tokens=10, stop_token_ids=[], return_logits=True)
    assert out2.reused_tokens == len(first.ids) + 7  # the last answer token was never fed
    assert rel_err(out2.logits, fresh.logits) <= 1e-5
    _assert_same_greedy(out2.tokens, fresh.tokens, fresh.logits)

    # same token ids, different first image: the cache must not be reused
    other = dict(inp2, pixel_values=np.concatenate([inp1["pixel_values"][::-1].copy(), pix2]))
    out3 = session.generate(**other, max_new_tokens=10, stop_token_ids=[], return_logits=True)
    fresh3 = m.generate(**other, max_new_tokens=10, stop_token_ids=[], return_logits=True)
    assert out3.reused_tokens == 0
    assert rel_err(out3.logits, fresh3.logits) <= 1e-5


def test_chat_session_grows_cache(jax_model):
    m = jax_model("tied")
    session = m.chat_session()
    ids = list(np.random.RandomState(15).randint(0, 290, size=10))
    cached = 0  # tokens whose keys/values the session holds: the prompt and all answer tokens but the last
    for turn in range(3):
        out = session.generate(input_ids=np.array([ids]), max_new_tokens=40, stop_token_ids=[], return_logits=True)
        fresh = m.generate(input_ids=np.array([ids]), max_new_tokens=40, stop_token_ids=[], return_logits=True)
        assert rel_err(out.logits, fresh.logits) <= 1e-5
        assert out.reused_tokens == cached
        cached = len(ids) + 40 - 1
        ids = ids + list(out.tokens[0]) + list(np.random.RandomState(turn).randint(0, 290, size=30))


# --- compile counts ---

def test_no_recompile_inside_a_bucket(jax_model):
    m = jax_model("tied")
    rng = np.random.RandomState(16)
    m.generate(input_ids=rng.randint(0, 290, size=(2, 20)), max_new_tokens=10, stop_token_ids=[])
    counts = (steps.prefill._cache_size(), steps.decode._cache_size())
    for t in (17, 25, 32):  # all in the 32 bucket
        m.generate(input_ids=rng.randint(0, 290, size=(2, t)), max_new_tokens=10, stop_token_ids=[])
    m.generate(input_ids=rng.randint(0, 290, size=(2, 19)), max_new_tokens=12, stop_token_ids=[],
               temperature=0.0)
    assert (steps.prefill._cache_size(), steps.decode._cache_size()) == counts


# --- bad requests ---

@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=5000), "exceeds the model's context of 4096"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (dict(temperature=1.0, top_p=1.5), r"top_p must lie in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be a non-negative integer"),
    (dict(min_p=2.0), "min_p must lie in"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(temperature=[1.0, 2.0, 3.0]), "one number per batch row"),
    (dict(temperature=float("nan")), "must be finite"),
    (dict(seed="x"), "seed must be an integer"),
    (dict(stop_token_ids=[99999]), "stop_token_ids must lie in"),
    (dict(beam_width=3), "unknown generation argument"),
])
def test_bad_generation_arguments(kw, match, jax_model):
    m = jax_model("tied")
    before = steps.prefill._cache_size()
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(InputError, match=match) as e:
        m.generate(input_ids=np.arange(10, 20)[None], **kw)
    assert "\n" not in str(e.value)
    assert steps.prefill._cache_size() == before  # rejected before anything compiled


def test_non_finite_logits_are_reported_not_sampled(jax_model):
    from qvl_jax import Model, NumericalError

    m = jax_model("tied")
    module = nnx.clone(m.module)
    norm = module.model.language_model.norm.weight
    norm.set_value(norm[...] * np.nan)
    broken = Model.from_module(module)
    with pytest.raises(NumericalError, match=r"NaN/inf logits \(batch row 0, new token 0\)"):
        broken.generate(input_ids=np.arange(10, 20)[None], max_new_tokens=4, stop_token_ids=[])


def test_cache_too_large_for_device_refused_before_allocating(jax_model, monkeypatch):
    from qvl_jax import ResourceError

    monkeypatch.setattr(gen_mod, "device_free_bytes", lambda: 4096)
    with pytest.raises(ResourceError, match=r"KV cache for batch 2 x 64 positions needs 0\.00 GiB but the device"):
        jax_model("tied").generate(input_ids=np.ones((2, 10), np.int32), max_new_tokens=4)
    with pytest.raises(ResourceError, match=r"KV cache for batch 1 x 64 positions"):
        jax_model("tied").chat_session().generate(input_ids=np.ones((1, 10), np.int32), max_new_tokens=4)
