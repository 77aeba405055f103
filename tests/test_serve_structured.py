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

    s = Server(qvl_jax.load("tiny-random"), Processor.from_pretrained("tiny-random"), tmp_path_factory.mktemp("m"),
               max_model_len=1024)
    s.tmp = tmp_path_factory.mktemp("m2")
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


PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                           "unit": {"enum": ["c", "f"]},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": PARAMS}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"tz": {"enum": ["utc", "cet"]}}, "required": ["tz"],
             "additionalProperties": False}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def test_tool_choice_required_and_named_always_validate(srv):
    def one(seed, choice="required"):
        r = srv.client.chat.completions.create(model=NAME, messages=MSGS, temperature=1.0, seed=seed, max_tokens=200,
                                               tools=TOOLS, tool_choice=choice)
        return r.choices[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(one, range(50)))
    names = set()
    for c in choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls, c.message
        for call in c.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
            names.add(call.function.name)
    assert names == {"get_weather", "get_time"}
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(5):
        c = one(seed, named)
        assert c.finish_reason == "tool_calls"
        assert {call.function.name for call in c.message.tool_calls} == {"get_time"}
    assert srv.wait_blocks() == srv.start_blocks


def test_tool_call_deltas_stream_as_the_whole_answer(srv):
    kw = dict(model=NAME, messages=MSGS, temperature=1.0, seed=3, max_tokens=200, tools=TOOLS, tool_choice="required")
    whole = srv.client.chat.completions.create(**kw).choices[0]
    calls, finish = {}, None
    for ch in srv.client.chat.completions.create(stream=True, **kw):
        for c in ch.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_tool_history_round_trips_through_the_template(srv):
    """An assistant's tool_calls and the tool's answer reach the chat template: the server's greedy
    answer equals model.generate on the HF-format messages rendered with the tools."""
    args = json.dumps({"city": "Bern", "unit": "c"})
    msgs = [{"role": "user", "content": "Weather in Bern?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21"}]
    r = srv.client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=12, tools=TOOLS,
                                           tool_choice="auto")
    hf = [msgs[0], {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": args}}]}, msgs[2]]
    inp = srv.proc.apply_chat_template(hf, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       literal_content=True, tools=TOOLS)
    assert "<tool_response>\nsunny, 21\n</tool_response>" in srv.proc.decode(inp["input_ids"][0].tolist(), False)
    out = srv.model.generate(input_ids=inp["input_ids"], max_new_tokens=12, stop_token_ids=srv.proc.eos_token_ids)
    text = srv.proc.decode(out.tokens[0, :out.lengths[0]].tolist(), skip_special_tokens=True)
    assert (r.choices[0].message.content or "") == text.strip() or r.choices[0].message.tool_calls


def test_tool_choice_none_renders_the_tools_unless_excluded(srv):
    """tool_choice "none", as vLLM by default: the tools are in the prompt (the template's <tools>
    block, the same tokens as tool_choice "auto"), and no tool call is parsed from the answer; with
    exclude_tools_when_tool_choice_none (vLLM's flag) the prompt is the one without tools."""
    import copy
    import dataclasses

    from qvl_jax.serving.app import _chat_inputs
    from qvl_jax.serving.protocol import ChatCompletionRequest

    def rendered(**kw):
        return srv.proc.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            literal_content=True, **kw)["input_ids"][0].tolist()

    with_tools, without = rendered(tools=TOOLS), rendered()
    text = srv.proc.decode(with_tools, skip_special_tokens=False)
    assert "<tools>" in text and '"name": "get_weather"' in text and "<tools>" not in srv.proc.decode(without, False)
    st = srv.app.state.qvl

    def prompt(state, choice):
        req = ChatCompletionRequest(model=NAME, messages=MSGS, tools=TOOLS, tool_choice=choice)
        return _chat_inputs(state, req)[0]["input_ids"][0].tolist()

    assert prompt(st, "none") == prompt(st, "auto") == with_tools
    excluding = copy.copy(st)
    excluding.cfg = dataclasses.replace(st.cfg, exclude_tools_when_tool_choice_none=True)
    assert prompt(excluding, "none") == without and prompt(excluding, "auto") == with_tools
    # Over HTTP: the prompt counted is the one with the tools, and the answer is text only (the
    # model's own <tool_call> text, if any, stays in content).
    for seed in range(3):
        r = srv.client.chat.completions.create(model=NAME, messages=MSGS, temperature=1.0, seed=seed, max_tokens=30,
                                               tools=TOOLS, tool_choice="none")
        assert r.usage.prompt_tokens == len(with_tools)
        assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, msg", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice must be"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot go with"),
    ({"chat_template_kwargs": {"tools": []}}, "may not set tools"),
])
def test_tool_refusals(srv, body, msg):
    r = _post(srv, {"max_tokens": 4, **body})
    assert r.status_code == 400 and msg in r.json()["error"]["message"], r.text


@pytest.fixture(scope="module")
def thinking(srv):
    """A server over the same model whose chat template is a Thinking one (opens <think> in the
    generation prompt, as Qwen3's Thinking templates do)."""
    import copy

    proc = copy.copy(srv.proc)
    proc.chat_template = srv.proc.chat_template.replace("'<|im_start|>assistant\\n'",
                                                        "'<|im_start|>assistant\\n<think>\\n'") + \
        "{#- </think> -#}"
    assert proc.chat_template != srv.proc.chat_template
    s = Server(srv.model, proc, srv.tmp, max_model_len=1024, warm_up=False)
    yield s
    s.close()


def test_reasoning_content_split_streamed_and_whole(thinking):
    close = thinking.proc.tokenizer.token_to_id("</think>")  # the model writes it as its added token
    grammar = f'start: /[a-z]{{2,5}}/ <[{close}]> "\\n\\n" /[a-z]{{2,5}}/'
    kw = dict(model=NAME, messages=MSGS, temperature=1.0, seed=4, max_tokens=40,
              extra_body={"structured_outputs": {"grammar": grammar}})
    m = thinking.client.chat.completions.create(**kw).choices[0].message
    reasoning, content = m.model_extra["reasoning_content"], m.content
    assert re.fullmatch("[a-z]{2,5}", reasoning) and re.fullmatch("[a-z]{2,5}", content)
    r_s, c_s = "", ""
    for ch in thinking.client.chat.completions.create(stream=True, **kw):
        for c in ch.choices:
            r_s += (c.delta.model_extra or {}).get("reasoning_content") or ""
            c_s += c.delta.content or ""
    assert (r_s, c_s) == (reasoning, content)
