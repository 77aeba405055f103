"""Reasoning splitting and tool-call parsing (serving/reasoning.py, serving/tools.py) on fixed model
texts in the formats of Qwen3's chat templates: whole, cut, and streamed in two chunks split at every
position (and one character at a time), whose deltas must join to the whole text's split."""

from __future__ import annotations

import json

import pytest

from qvl_jax.serving import reasoning, tools
from qvl_jax.serving.tools import ChatOutput

CALL_A = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}\n</tool_call>'
CALL_B = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'

# (text, template opened <think>, reasoning, content)
REASONING = [
    ("I should say hi.\n</think>\n\nHello!", True, "I should say hi.\n", "Hello!"),
    ("<think>\nhmm\n</think>\n\nHi <b>there</b>", False, "\nhmm\n", "Hi <b>there</b>"),
    ("No thinking here. <think> is just text", False, "", "No thinking here. <think> is just text"),
    ("still thinking, cut by max_tok", True, "still thinking, cut by max_tok", ""),
    ("cut inside the closing tag </thi", True, "cut inside the closing tag </thi", ""),
    ("<thi", False, "", "<thi"),
    ("</think>\n\n", True, "", ""),
    ("a < b and </ c", True, "a < b and </ c", ""),
]


def _chunked(text: str):
    yield [text]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)


@pytest.mark.parametrize("text, started, want_r, want_c", REASONING)
def test_reasoning_split_whole_and_at_every_position(text, started, want_r, want_c):
    assert reasoning.split(text, started) == (want_r, want_c)
    for chunks in _chunked(text):
        s = reasoning.ReasoningSplitter(started)
        parts = [s.feed(c) for c in chunks] + [s.finish()]
        assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == (want_r, want_c), chunks


# (text, content, calls as (name, arguments object))
TOOLS = [
    (CALL_A, "", [("get_weather", {"city": "Zürich", "days": 2})]),
    ("Let me check.\n" + CALL_A + "\n" + CALL_B, "Let me check.",
     [("get_weather", {"city": "Zürich", "days": 2}), ("get_time", {})]),
    ("plain answer, no calls \n", "plain answer, no calls \n", []),
    ('<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call>', "", [("f", {"x": 1})]),
    ("<tool_call>\nnot json\n</tool_call> after", "<tool_call>\nnot json\n</tool_call> after", []),
    ('<tool_call>\n{"name": "f", "argu', '<tool_call>\n{"name": "f", "argu', []),  # cut by max_tokens
    ('<tool_call>\n{"name": "f", "arguments": {"y": [1, 2]}}\n', "", [("f", {"y": [1, 2]})]),  # cut after the JSON
    ("text then <tool_c", "text then <tool_c", []),
    (CALL_B + "\nand a remark", "and a remark", [("get_time", {})]),
]


@pytest.mark.parametrize("text, content, calls", TOOLS)
def test_tool_calls_whole_and_at_every_position(text, content, calls):
    got_content, got_calls = tools.parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    for chunks in _chunked(text):
        p = tools.ToolCallParser()
        events = [e for c in chunks for e in p.feed(c)] + p.finish()
        assert "".join(v for k, v in events if k == "text") == content, chunks
        assert [(v.name, json.loads(v.arguments)) for k, v in events if k == "call"] == calls


def test_chat_output_reasoning_then_tools_streamed_equals_whole():
    text = "I need the weather.\n</think>\n\n" + CALL_A + "\n" + CALL_B
    for chunks in _chunked(text):
        out = ChatOutput(reasoning=True, started=True, tools=True)
        deltas = [d for c in chunks for d in out.feed(c)] + out.finish()
        msg = out.message()
        assert msg["reasoning_content"] == "I need the weather.\n" and msg["content"] is None
        assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather", "get_time"]
        streamed = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
        assert [c["index"] for c in streamed] == [0, 1]
        assert [c["id"] for c in streamed] == [c["id"] for c in msg["tool_calls"]]
        assert json.loads(streamed[0]["function"]["arguments"]) == {"city": "Zürich", "days": 2}
        assert "".join(d.get("reasoning_content", "") for d in deltas) == msg["reasoning_content"]


def test_call_grammar_names_the_tokens_and_the_schema():
    fn = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "integer"}}, "required": ["x"]}}}
    g = tools.call_grammar([fn], 500, 501)
    assert "<[500]>" in g and "<[501]>" in g and '"const": "f"' in g
