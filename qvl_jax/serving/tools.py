"""Tool calls in Qwen3's format, parsed from the answer's text incrementally, and the grammar that
forces them (tool_choice "required" or a named function).

Qwen3's chat template tells the model to answer a call as

    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

one block per call (parallel calls: several blocks, a newline between). `ToolCallParser` turns the
content into text and `ToolCall`s (OpenAI's id, name, arguments as a JSON string); whitespace next to
a call is not content. A block that does not hold such a JSON object (or is cut before its end
without one) stays text. `ChatOutput` runs the reasoning split first (serving/reasoning.py), then
the tool-call parser over the content, and gives OpenAI's chat deltas. Host only (no JAX).
"""

from __future__ import annotations

import dataclasses
import json
import uuid

from qvl_jax.engine.structured import JSON_OPTIONS
from qvl_jax.serving.protocol import ApiError
from qvl_jax.serving.reasoning import ReasoningSplitter, _partial_suffix

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object's text
    id: str = dataclasses.field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def parse_call(body: str) -> ToolCall | None:
    """The call in one block's text, or None when it is not {"name": str, "arguments": object}."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolCallParser:
    """feed(text) / finish() -> events: ("text", str) or ("call", ToolCall), in answer order."""

    def __init__(self):
        self.in_call = False
        self.buf = ""
        self.space = ""  # trailing whitespace held back: content only if more text follows
        self.after_call = False  # whitespace right after a call is not content
        self.calls = 0

    def _text(self, s: str, out: list) -> None:
        if self.after_call:
            s = s.lstrip()
            if not s:
                return
            self.after_call = False
        body = s.rstrip()
        if body:
            out.append(("text", self.space + body))
            self.space = s[len(body):]
        else:
            self.space += s

    def feed(self, text: str) -> list:
        self.buf += text
        out: list = []
        while self.buf:
            if not self.in_call:
                at = self.buf.find(OPEN)
                if at >= 0:
                    self._text(self.buf[:at], out)
                    self.space = ""  # whitespace before a call is not content
                    self.buf, self.in_call = self.buf[at + len(OPEN):], True
                    continue
                keep = _partial_suffix(self.buf, OPEN)
                self._text(self.buf[:len(self.buf) - keep], out)
                self.buf = self.buf[len(self.buf) - keep:]
                break
            at = self.buf.find(CLOSE)
            if at < 0:
                break
            body, self.buf, self.in_call = self.buf[:at], self.buf[at + len(CLOSE):], False
            self._close(body, out, closed=True)
        return out

    def _close(self, body: str, out: list, closed: bool) -> None:
        call = parse_call(body)
        if call is None:  # not a call: the block stays text, as written
            self._text(OPEN + body + (CLOSE if closed else ""), out)
            return
        out.append(("call", call))
        self.calls += 1
        self.space, self.after_call = "", True

    def finish(self) -> list:
        out: list = []
        buf, self.buf = self.buf, ""
        if self.in_call:
            self.in_call = False
            self._close(buf, out, closed=False)
        elif buf:
            self._text(buf, out)
        if self.space and not self.calls:  # trailing whitespace of a plain answer is its own
            out.append(("text", self.space))
        self.space = ""
        return out


def parse(text: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole answer."""
    p = ToolCallParser()
    events = p.feed(text) + p.finish()
    return "".join(v for k, v in events if k == "text"), [v for k, v in events if k == "call"]


class ChatOutput:
    """One chat choice's text -> OpenAI's message parts: `feed(delta)` / `finish()` return the chat
    deltas ({"reasoning_content": ...}, {"content": ...}, {"tool_calls": [...]}) and `message()`
    the whole message. reasoning: split off `<think>` (started: the prompt opened it); tools: parse
    tool calls from the content."""

    def __init__(self, reasoning: bool = False, started: bool = False, tools: bool = False):
        self.splitter = ReasoningSplitter(started) if reasoning else None
        self.parser = ToolCallParser() if tools else None
        self.reasoning, self.content, self.calls = [], [], []

    def _deltas(self, reasoning: str, content_events: list) -> list[dict]:
        out = []
        if reasoning:
            self.reasoning.append(reasoning)
            out.append({"reasoning_content": reasoning})
        for kind, v in content_events:
            if kind == "text":
                self.content.append(v)
                out.append({"content": v})
            else:
                out.append({"tool_calls": [v.openai(len(self.calls))]})
                self.calls.append(v)
        return out

    def _content(self, text: str, final: bool) -> list:
        if self.parser is None:
            return [("text", text)] if text else []
        return self.parser.feed(text) + (self.parser.finish() if final else [])

    def feed(self, text: str) -> list[dict]:
        r, c = self.splitter.feed(text) if self.splitter is not None else ("", text)
        return self._deltas(r, self._content(c, False))

    def finish(self) -> list[dict]:
        r, c = self.splitter.finish() if self.splitter is not None else ("", "")
        return self._deltas(r, self._content(c, True))

    def message(self) -> dict:
        msg = {"role": "assistant", "content": "".join(self.content) if self.content or not self.calls else None}
        if self.splitter is not None:
            msg["reasoning_content"] = "".join(self.reasoning) if self.reasoning else None
        if self.calls:
            msg["tool_calls"] = [c.openai() for c in self.calls]
        return msg


def function_schema(tool: dict) -> dict:
    """The JSON schema of one call of a tool: {"name": its name, "arguments": its parameters}."""
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def call_grammar(tools: list[dict], open_id: int, close_id: int, parallel: bool = True,
                 think_close: int | None = None) -> str:
    """A Lark grammar (llguidance's dialect) for one or more (parallel) call blocks of these tools,
    each `<tool_call>\\n{json}\\n</tool_call>` with the arguments valid against the function's
    parameters. open_id / close_id: the token ids of <tool_call> / </tool_call> (added tokens, which
    llguidance matches by id). think_close: the calls follow a Thinking model's reasoning, closed by
    this token (`</think>`) and newlines."""
    schema = function_schema(tools[0]) if len(tools) == 1 else {"anyOf": [function_schema(t) for t in tools]}
    schema["x-guidance"] = JSON_OPTIONS
    rep = ' ("\\n" call)*' if parallel else ""
    head = "start: calls\n" if think_close is None else f'start: /(?s:.*)/ <[{think_close}]> "\\n"* calls\n'
    return (f"{head}calls: call{rep}\ncall: <[{open_id}]> \"\\n\" body \"\\n\" <[{close_id}]>\n"
            f"body: %json {json.dumps(schema)}\n")


def forced(choice, defined: list[dict]) -> list[dict]:
    """The tools (OpenAI tool dicts) of which the answer must call one or more: all of them for
    tool_choice "required", the named one for {"type": "function", "function": {"name": ...}}, none
    for None / "none" / "auto"; a bad tool_choice is an ApiError 400."""
    if choice in (None, "none", "auto"):
        return []
    if choice == "required":
        if not defined:
            raise ApiError(400, "tool_choice required needs tools", param="tool_choice")
        return defined
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        and isinstance(choice.get("function"), dict) else None
    if name is None:
        raise ApiError(400, "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": "
                            "{\"name\": ...}}", param="tool_choice")
    named = [t for t in defined if t["function"]["name"] == name]
    if not named:
        raise ApiError(400, f"tool_choice names the function {name!r}, which is not among the tools",
                       param="tool_choice")
    return named
