"""Structured outputs (engine/structured.py): the packed mask unpacked in the sampler, grammars
compiled by llguidance for the checkpoint's real byte-level tokens, constrained answers that parse
and validate (JSON schema, regex, choice, grammar) through model.generate, stream and the engine,
and a constrained request next to unconstrained ones leaving theirs unchanged."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

import qvl_jax
from qvl_jax import InputError
from qvl_jax.engine import sampling, structured

SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["cat", "dog"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "inner": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False},
    },
    "required": ["n", "kind", "tags", "inner"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def setup():
    m = qvl_jax.load("tiny-random")
    proc = qvl_jax.Processor.from_pretrained(m.path)

    def prompt(text: str) -> dict:
        inp = proc.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True, return_tensors="np")
        return {"input_ids": inp["input_ids"]}

    def text(tokens, n=None) -> str:
        tokens = np.asarray(tokens).ravel()[:n]
        return proc.batch_decode(tokens[None], skip_special_tokens=True)[0]

    return m, prompt, text


def test_mask_unpacks_bit_i_of_word_i_over_32():
    rng = np.random.RandomState(0)
    vocab = 70  # not a multiple of 32: the last word's high bits are ignored
    allow = rng.randint(-2**31, 2**31, size=(3, 3), dtype=np.int64).astype(np.int32)
    logits = rng.randn(3, vocab).astype(np.float32)
    got = np.asarray(sampling.allowed(jnp.asarray(logits), jnp.asarray(allow)))
    bits = (allow.view(np.uint32)[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1
    ok = bits.reshape(3, -1)[:, :vocab].astype(bool)
    np.testing.assert_array_equal(got, np.where(ok, logits, np.finfo(np.float32).min))


@pytest.mark.parametrize("value, msg", [
    ({"jsn": {}}, "unknown structured output kind"),
    ({"json": {}, "regex": "a"}, "exactly one of"),
    ({}, "exactly one of"),
    ({"choice": []}, "non-empty list"),
    ({"json": "{not json"}, "not valid JSON"),
    ("json", "must be a qvl_jax.StructuredOutputs or a dict"),
])
def test_bad_structured_is_one_input_error(value, msg):
    with pytest.raises(InputError, match=msg):
        qvl_jax.SamplingParams(structured=value)


@pytest.mark.parametrize("value, msg", [
    ({"json": {"type": "object", "properties": {"a": {"type": "nosuchtype"}}}}, "structured json: .*nosuchtype"),
    ({"regex": "a(b"}, "structured regex: .*unclosed group"),
    ({"grammar": "start: foo"}, "structured grammar: .*foo"),
])
def test_a_grammar_the_library_refuses_is_an_input_error_before_any_work(setup, value, msg):
    m, prompt, _ = setup
    with pytest.raises(InputError, match=msg) as e:
        m.generate(**prompt("x"), max_new_tokens=4, structured=value)
    assert "\n" not in str(e.value)


def test_greedy_and_sampled_json_schema_answers_validate(setup):
    m, prompt, text = setup
    for kw in ({}, {"temperature": 1.0, "seed": 1}, {"temperature": 1.0, "seed": 2}):
        out = m.generate(**prompt("Give me JSON"), max_new_tokens=80, structured={"json": SCHEMA}, **kw)
        assert out.lengths[0] < 80, "the answer should end before max_new_tokens"
        answer = json.loads(text(out.tokens, out.lengths[0]))
        jsonschema.validate(answer, SCHEMA)
        assert list(answer) == list(SCHEMA["properties"])  # in the schema's order, as OpenAI's strict mode


def test_regex_choice_grammar_and_json_object(setup):
    m, prompt, text = setup
    for seed in range(3):
        kw = dict(max_new_tokens=40, temperature=1.0, seed=seed)
        out = m.generate(**prompt("id?"), structured={"regex": r"[0-9]{3}-[a-z]{2}"}, **kw)
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text(out.tokens, out.lengths[0]))
        out = m.generate(**prompt("pick"), structured={"choice": ["yes", "no", "maybe not"]}, **kw)
        assert text(out.tokens, out.lengths[0]) in ("yes", "no", "maybe not")
        out = m.generate(**prompt("g"), structured={"grammar": 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[1-9]/'}, **kw)
        assert re.fullmatch(r"\([1-9](\+[1-9])*\)", text(out.tokens, out.lengths[0])), text(out.tokens)
    out = m.generate(**prompt("obj"), max_new_tokens=60, structured={"json_object": True},
                     presence_penalty=0.0)
    if out.lengths[0] < 60:  # an unbounded object may be cut; a finished one parses
        assert isinstance(json.loads(text(out.tokens, out.lengths[0])), dict)


def test_stream_equals_generate_under_a_constraint(setup):
    m, prompt, _ = setup
    kw = dict(max_new_tokens=40, structured={"json": SCHEMA}, temperature=1.0, seed=5)
    out = m.generate(**prompt("s"), **kw)
    toks = [int(t[0]) for t in m.stream(**prompt("s"), **kw)]
    np.testing.assert_array_equal(toks[:out.lengths[0]], out.tokens[0, :out.lengths[0]])


def test_engine_constrained_next_to_unconstrained_equals_alone(setup):
    """A constrained request in the engine's batch: its tokens are model.generate's for it alone,
    and the unconstrained requests beside it (multi-step loops around its one-step ones) keep theirs."""
    m, prompt, text = setup
    prompts = [prompt(f"question number {i}") for i in range(4)]
    settings = [dict(structured={"json": SCHEMA}, temperature=1.0, seed=7), dict(), dict(temperature=1.0, seed=3),
                dict(structured={"regex": "[a-c]{2,9}"})]
    alone = [m.generate(**p, max_new_tokens=60, **kw) for p, kw in zip(prompts, settings)]
    with m.engine(max_num_seqs=4, max_model_len=128, block_size=8, decode_steps=4) as eng:
        handles = [eng.submit(p, max_new_tokens=60, **kw) for p, kw in zip(prompts, settings)]
        got = [h.result() for h in handles]
        assert eng.num_free_blocks == eng.num_blocks - 1  # nothing left behind (the trash block aside)
    for a, g in zip(alone, got):
        np.testing.assert_array_equal(g.tokens, a.tokens[0, :a.lengths[0]])
    jsonschema.validate(json.loads(text(got[0].tokens)), SCHEMA)
    assert re.fullmatch("[a-c]{2,9}", text(got[3].tokens))


def test_engine_bad_grammar_fails_alone(setup):
    m, prompt, _ = setup
    with m.engine(max_num_seqs=2, max_model_len=128, block_size=8) as eng:
        bad = eng.submit(prompt("x"), max_new_tokens=4, structured={"regex": "a(b"})
        good = eng.submit(prompt("x"), max_new_tokens=4)
        with pytest.raises(InputError, match="unclosed group"):
            bad.result()
        assert len(good.result().tokens) == 4


def test_masks_of_the_checkpoint_tokens(setup):
    """The compiler reads the checkpoint's real byte-level tokens: after '{"' only tokens that can
    continue a key of the schema are allowed, e.g. 'n' but not 'x'."""
    m, _, _ = setup
    tok = qvl_jax.Processor.from_pretrained(m.path).tokenizer
    g = structured.for_request(structured.tokenizer_json(m.path), m.config.text.vocab_size,
                               structured.StructuredOutputs(json=SCHEMA), [tok.token_to_id("<|im_end|>")])
    mt = g.matcher()
    mt.consume(tok.encode('{"', add_special_tokens=False).ids)
    mask = structured.masks([mt], 1, m.config.text.vocab_size)[0]

    def ok(t):
        return bool((int(mask[t // 32]) >> (t % 32)) & 1)

    assert ok(tok.token_to_id("n")) and not ok(tok.token_to_id("x"))
    assert not ok(tok.token_to_id("<|im_end|>"))


def test_a_constraint_after_reasoning_leaves_the_reasoning_free(setup):
    """For Thinking models the server wraps the constraint: any text, </think>, newlines, then the
    constrained answer (serving: response_format / forced tool calls with a template that opened
    <think>)."""
    from qvl_jax.serving import tools

    m, _, _ = setup
    tok = qvl_jax.Processor.from_pretrained(m.path).tokenizer
    close, vocab = tok.token_to_id("</think>"), m.config.text.vocab_size
    end = [tok.token_to_id("<|im_end|>")]
    ids = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    fn = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer", "maximum": 9}}, "required": ["x"]}}}
    cases = [(structured.StructuredOutputs(json=SCHEMA).after_reasoning(close),
              json.dumps({"n": 3, "kind": "dog", "tags": [], "inner": {"ok": True}}), '{"n": "3"'),
             (structured.StructuredOutputs(regex="a/[0-9]+").after_reasoning(close), "a/42", "b"),
             (structured.StructuredOutputs(choice=["yes", "no"]).after_reasoning(close), "no", "nah"),
             (structured.StructuredOutputs(grammar=tools.call_grammar([fn], tok.token_to_id("<tool_call>"),
                                                                      tok.token_to_id("</tool_call>"), think_close=close)),
              '<tool_call>\n{"name": "f", "arguments": {"x": 4}}\n</tool_call>', '<tool_call>\n{"name": "g"')]
    for so, good, bad in cases:
        g = structured.for_request(structured.tokenizer_json(m.path), vocab, so, end)
        mt = g.matcher()
        mt.consume(ids("Hmm, {not json} <b> 12 /x/ "))  # the reasoning: anything
        mask = structured.masks([mt], 1, vocab)[0]
        assert all((int(mask[t // 32]) >> (t % 32)) & 1 for t in ids("x{<") + [close])
        mt.consume([close] + ids("\n\n") + ids(good))
        assert mt.accepting
        mt = g.matcher()
        mt.consume(ids("why") + [close] + ids("\n\n"))
        with pytest.raises(InputError, match="breaks the grammar"):
            mt.consume(ids(bad))
