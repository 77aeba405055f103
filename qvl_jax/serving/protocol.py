"""OpenAI request bodies as pydantic models, OpenAI's error object, and the response pieces built from
tokens (logprobs objects, server-sent events).

One rule for fields: a field this server does not know is ignored (as vLLM does, and so clients that
send newer or vendor fields keep working); a field it knows but does not implement (tools,
logit_bias, ...) is refused with a 400 naming it, because
ignoring it would silently change the answer.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """A refusal: HTTP status + OpenAI error object fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Model):
    type: Literal["text"]
    text: str


class MediaURL(_Model):
    url: str
    detail: str | None = None


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: MediaURL | str


class VideoPart(_Model):
    type: Literal["video_url"]
    video_url: MediaURL | str


Part = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class FunctionCall(_Model):
    name: str
    arguments: str | dict = "{}"  # OpenAI sends a JSON string


class ToolCallIn(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's calls, in the history
    tool_call_id: str | None = None  # a tool message's answer to a call
    reasoning_content: str | None = None  # an assistant's reasoning, in the history (Thinking templates)


class FunctionDef(_Model):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Model):
    include_usage: bool = False


_Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Sampling(_Model):
    """Fields both endpoints share (OpenAI's, then vLLM's extras top_k, min_p, repetition_penalty)."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stop: str | list[str | int] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**64)] | None = None
    presence_penalty: _Penalty | None = None
    frequency_penalty: _Penalty | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # vLLM: -1 or 0 = off
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    ignore_eos: bool = False  # vLLM extra: only stop / stop_token_ids end the answer (benchmarks)
    response_format: Any = None  # OpenAI's: text, json_object, json_schema (`structure`)
    structured_outputs: Any = None  # vLLM's: one of json, regex, choice, grammar, json_object (`structure`)
    # Known but not implemented: refused (see the module docstring).
    logit_bias: Any = None
    best_of: Any = None
    suffix: Any = None
    echo: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    add_generation_prompt: bool = True  # vLLM extra
    tools: list[Tool] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM extra: template variables (enable_thinking, ...)
    continue_final_message: bool = False  # vLLM extra
    mm_processor_kwargs: dict[str, Any] | None = None  # vLLM extra: min_pixels, max_pixels, fps, num_frames


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None  # alternatives per token (OpenAI allows 5)


def unsupported(req: _Sampling) -> str | None:
    """The first known-but-unimplemented field that is set to something other than its no-op value."""
    noop = {"logit_bias": (None, {}), "best_of": (None, 1),
            "suffix": (None, ""), "echo": (None, False), "tools": (None, []), "tool_choice": (None, "none"),
            "functions": (None, []), "function_call": (None, "none"), "audio": (None,), "modalities": (None, ["text"]),
            "prediction": (None,)}
    chat = isinstance(req, ChatCompletionRequest)
    for name, ok in noop.items():
        if chat and name in ("tools", "tool_choice"):
            continue
        if getattr(req, name) not in ok:
            return name
    return None


def structure(req: _Sampling) -> dict | None:
    """The constraint a request asks for, as `qvl_jax.StructuredOutputs` fields (None: none), from
    OpenAI's response_format or vLLM's structured_outputs (not both). An unknown type or kind is an
    ApiError 400 naming it."""
    fmt, so = req.response_format, req.structured_outputs
    if fmt is not None and so is not None:
        raise ApiError(400, "give response_format or structured_outputs, not both", param="structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise ApiError(400, "structured_outputs must be an object with one of json, regex, choice, grammar, "
                                "json_object", param="structured_outputs")
        return {k: v for k, v in so.items() if v is not None}
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise ApiError(400, "response_format.json_schema must be an object with a schema object",
                           param="response_format")
        # The schema is always enforced (strict or not): OpenAI's strict, for every request.
        return {"json": js.get("schema", {})}
    raise ApiError(400, f"response_format.type must be one of text, json_object, json_schema; got {kind!r}",
                   param="response_format")


# ---------------------------------------------------------------------------------------------------
# Response pieces: logprobs objects (token_bytes: id -> the bytes it stands for) and SSE events


def _token_text(token_bytes: Callable[[int], bytes], token_id: int) -> tuple[str, list[int]]:
    b = token_bytes(token_id)
    return b.decode("utf-8", errors="replace"), list(b)


def chat_logprobs(token_bytes: Callable[[int], bytes], entries: list) -> dict:
    """OpenAI's chat logprobs object for (id, logprob, top ids, top logprobs) entries."""
    content = []
    for tok, lp, top_ids, top_lps in entries:
        text, b = _token_text(token_bytes, tok)
        top = []
        for t, v in zip(top_ids, top_lps):
            tt, tb = _token_text(token_bytes, t)
            top.append({"token": tt, "logprob": v, "bytes": tb})
        content.append({"token": text, "logprob": lp, "bytes": b, "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(token_bytes: Callable[[int], bytes], entries: list, offset: int) -> dict:
    """The completions endpoint's logprobs object; offset: the text offset of the first token."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, lp, top_ids, top_lps in entries:
        text = _token_text(token_bytes, tok)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        top = {_token_text(token_bytes, t)[0]: v for t, v in zip(top_ids, top_lps)}
        top.setdefault(text, lp)  # the chosen token too, as OpenAI and vLLM list it
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def sse(obj) -> str:
    """One server-sent event carrying obj as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"
