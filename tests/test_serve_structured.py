"""Structured outputs, tool calls and reasoning through `qvl-jax serve` with the official openai
client on random weights: json_schema answers (nested objects, arrays, enums, required fields) that
always parse and validate at temperature 1, regex and choice constraints, streaming equal to
non-streaming, a cut answer's finish_reason, and the refusals (400 with OpenAI's error object)."""

from __future__ import annotations

import concurrent.futures
import json
import re

import httpx
import jsonschema
import openai
import pytest

from test_serve import KEY, NAME, Server

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                                  "floor": {"type": "integer", "minimum": 0, "maximum": 9}},
                 "required": ["city", "floor"], "additionalProperties": False},
    },
    "required": ["name", "age", "pets", "home"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
MSGS = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    import qvl_jax
    from qvl_jax.processing.processor import Processor

    s = Server(qvl_jax.load("tiny-random"), Processor.from_pretrained("tiny-random"), tmp_path_factory.mktemp("m"))
    yield s
    s.close()


def _post(srv, body: dict) -> httpx.Response:
    return httpx.post(srv.base + "/v1/chat/completions", json={"model": NAME, "messages": MSGS, **body},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def test_json_schema_answers_always_validate(srv):
    def one(seed):
        r = srv.client.chat.completions.create(model=NAME, messages=MSGS, temperature=1.0, seed=seed, max_tokens=150,
                                               response_format=RESPONSE_FORMAT)
        return r.choices[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(one, range(50)))
    for c in choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    assert len({c.message.content for c in choices}) > 10  # sampled, not one answer
    assert srv.wait_blocks() == srv.start_blocks


def test_regex_choice_json_object_and_grammar(srv):
    c = srv.client.chat.completions.create
    for seed in range(4):
        r = c(model=NAME, messages=MSGS, temperature=1.0, seed=seed, max_tokens=20,
              extra_body={"structured_outputs": {"regex": r"[A-Z][a-z]{1,4} [0-9]{2}"}})
        assert re.fullmatch(r"[A-Z][a-z]{1,4} [0-9]{2}", r.choices[0].message.content)
        r = c(model=NAME, messages=MSGS, temperature=1.0, seed=seed, max_tokens=20,
              extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
        assert r.choices[0].message.content in ("red", "green", "blue")
        r = c(model=NAME, messages=MSGS, temperature=1.0, seed=seed, max_tokens=20,
              extra_body={"structured_outputs": {"grammar": 'start: "x" ("+" DIGIT)*\nDIGIT: /[0-9]/'}})
        assert re.fullmatch(r"x(\+[0-9])*", r.choices[0].message.content)
    r = c(model=NAME, messages=MSGS, max_tokens=200, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_stream_equals_non_stream_and_a_cut_answer_says_length(srv):
    kw = dict(model=NAME, messages=MSGS, temperature=1.0, seed=11, max_tokens=150, response_format=RESPONSE_FORMAT)
    whole = srv.client.chat.completions.create(**kw).choices[0]
    text, finish = "", None
    for ch in srv.client.chat.completions.create(stream=True, **kw):
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
    assert (text, finish) == (whole.message.content, whole.finish_reason)
    cut = srv.client.chat.completions.create(**{**kw, "max_tokens": 5}).choices[0]
    assert cut.finish_reason == "length" and whole.message.content.startswith(cut.message.content)


@pytest.mark.parametrize("body, msg", [
    ({"structured_outputs": {"jsonn": {}}}, "unknown structured output kind"),
    ({"structured_outputs": {"regex": "a(b"}}, "unclosed group"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one of"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
     "wat"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "not both"),
])
def test_refusals_are_400_with_openai_error_objects(srv, body, msg):
    r = _post(srv, {"max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert msg in err["message"] and err["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        srv.client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=4, extra_body=body)
    assert srv.wait_blocks() == srv.start_blocks
