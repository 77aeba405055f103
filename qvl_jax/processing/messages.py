"""Chat messages in Hugging Face's format: checked, normalised copies, and the media they hold.

What it holds:
  - `_split_conversations` / `_normalize_conversation` / `_normalize_item`: one conversation or a batch
    of them -> checked copies (None-valued keys dropped, OpenAI image_url items as image items), each
    malformed message a one-line `InputError` before any image is decoded.
  - `_collect_media`: the images, videos and per-video source fps of the messages, in order.
  - continue_final_message's tag and cut, and `_alias_reasoning` (a reasoning field under every name
    templates read it by).
  - `_describe` / `_check_utf8`: the input checks the processor shares.
"""

from __future__ import annotations

from typing import Any, Mapping

from qvl_jax.errors import InputError

_CONTENT_TYPES = ("text", "image", "video")
# Message keys the template reads a model's reasoning from; transformers copies whichever is given
# into both reasoning_content and thinking, so "thinking" templates see it under either name.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _describe(x: Any) -> str:
    t = type(x)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _check_utf8(text: str, where: str) -> str:
    """Lone surrogates (bytes that were not UTF-8, as sys.argv and os.fsdecode keep them) cannot be
    tokenized; say so in one line rather than fail inside the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{where} is not valid UTF-8: {text[e.start]!r} at character {e.start} (a lone "
                         "surrogate, e.g. from undecodable bytes)") from None
    return text


def _split_conversations(messages: Any) -> tuple[list, bool]:
    if not isinstance(messages, (list, tuple)):
        raise InputError(
            f"messages must be a list of message dicts (or a list of such lists), got {_describe(messages)}"
        )
    if not messages:
        raise InputError("messages is empty")
    if isinstance(messages[0], (list, tuple)):
        return list(messages), True
    return [messages], False


def _normalize_conversation(conversation: Any, c: int, batched: bool) -> list[dict]:
    """Checked copy of one conversation: None-valued keys dropped (as transformers does), OpenAI
    image_url items turned into image items, every content item's type known."""
    where0 = f"conversation {c}, " if batched else ""
    if not isinstance(conversation, (list, tuple)):
        raise InputError(f"conversation {c} must be a list of message dicts, got {_describe(conversation)}")
    if not conversation:
        raise InputError(f"conversation {c} is empty")
    out = []
    for m, message in enumerate(conversation):
        if not isinstance(message, Mapping):
            raise InputError(
                f"{where0}message {m}: expected a dict with 'role' and 'content', got {_describe(message)}"
            )
        message = {k: v for k, v in message.items() if v is not None}
        role = message.get("role")
        if not isinstance(role, str):
            raise InputError(f"{where0}message {m}: 'role' must be a string, got {_describe(role)}")
        where = f"{where0}message {m} ({role})"
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            items = []
            for i, item in enumerate(content):
                items.append(_normalize_item(item, f"{where}, content item {i}"))
            message["content"] = items
        elif isinstance(content, str):
            _check_utf8(content, f"{where} content")
        elif content is not None:
            raise InputError(
                f"{where}: 'content' must be a string or a list of content items, got {_describe(content)}"
            )
        out.append(message)
    return out


def _normalize_item(item: Any, where: str) -> dict:
    if not isinstance(item, Mapping):
        raise InputError(f"{where}: expected a dict like {{'type': 'text', 'text': ...}}, got {_describe(item)}")
    item = {k: v for k, v in item.items() if v is not None}
    kind = item.get("type")
    if kind == "image_url" and "image_url" in item:
        url = item["image_url"]
        return {"type": "image", "url": url.get("url", "") if isinstance(url, Mapping) else url}
    if kind not in _CONTENT_TYPES:
        got = "no 'type'" if kind is None else f"unknown content type {kind!r}"
        raise InputError(f"{where}: {got}; expected one of {', '.join(map(repr, _CONTENT_TYPES))}")
    if kind == "text" and not isinstance(item.get("text"), str):
        raise InputError(f"{where}: 'text' must be a string, got {_describe(item.get('text'))}")
    if kind == "text":
        _check_utf8(item["text"], f"{where} text")
    if kind in ("image", "video") and _media(item) is None:
        keys = "'image', 'url' or 'path'" if kind == "image" else "'video', 'url' or 'path'"
        raise InputError(f"{where}: {kind} item has no {keys} key")
    return item


def _media(item: Mapping) -> Any:
    for key in (item["type"], "url", "path"):
        if key in item:
            return item[key]
    return None


def _collect_media(conversations: list[list[dict]]) -> tuple[list, list, list]:
    """Images, videos and per-video source fps of every message, in conversation order (transformers
    collects from all roles; the placeholder count check then catches media the template dropped)."""
    images, videos, rates = [], [], []
    for conversation in conversations:
        for message in conversation:
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for item in content:
                if item["type"] == "image":
                    images.append(_media(item))
                elif item["type"] == "video":
                    videos.append(_media(item))
                    rates.append(item.get("video_fps"))
    return images, videos, rates


# continue_final_message: the final text is tagged before rendering and the prompt cut where the tag
# lands, which drops whatever the template writes after the message (its end-of-turn), as transformers does
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _tag_final_message(chat: list[dict]) -> str:
    content = chat[-1].get("content")
    if isinstance(content, str):
        chat[-1]["content"] = content + _CONTINUE_TAG
        return content
    for block in reversed(content or []):
        if "text" in block:
            final = block["text"]
            block["text"] = final + _CONTINUE_TAG
            return final
    raise InputError("continue_final_message is set but the last message has no text to continue")


def _cut_at_tag(prompt: str, final_text: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final_text.strip() not in prompt or tag not in prompt:
        raise InputError(
            "continue_final_message is set but the chat template does not write the last message's text"
        )
    at = prompt.rindex(tag)
    # a template that strips the message keeps the tag's trailing space out too: strip what precedes it
    return prompt[:at] if prompt[at: at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else prompt[:at].rstrip()


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}
