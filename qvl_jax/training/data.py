"""Fine-tuning data: chat records from JSONL, assistant-only labels, and batches in a seeded order.

    records = read_jsonl("train.jsonl")      # one {"messages": [...]} per line, checked
    batches = Batches(records, processor, batch_size=4, seed=0)
    batch = batches.next()                   # processor arrays + "labels"; batches.position advances

Labels follow TRL's assistant-only loss for the Qwen chat template: the tokens after each
`<|im_start|>assistant\\n` up to and including its `<|im_end|>` are trained, everything else
(system and user turns, the assistant header, padding) is -100. The order is a fresh permutation
of the records per epoch (drawn from the seed and the epoch number); an epoch's last batch holds
its remainder (filled up with rows that carry no labels), and the stream position alone (records
consumed) says where training stands.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from qvl_jax.errors import InputError
from qvl_jax.processing.media_io import load_video
from qvl_jax.training.loss import IGNORE

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
_ROLES = ("system", "user", "assistant", "tool")
_CONTENT_TYPES = ("text", "image", "video")
_MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
                 "pixel_values_videos", "video_grid_thw")


# ----------------------------------------------------------------------------------------------------
# labels


def _chat_tokens(processor) -> tuple[list[int], int, int]:
    """(ids of "<|im_start|>assistant", id of "\\n", id of <|im_end|>) in this processor's tokenizer."""
    header = processor.encode(IM_START + "assistant", add_special_tokens=False)
    newline = processor.encode("\n", add_special_tokens=False)
    end = processor.tokenizer.token_to_id(IM_END)
    if end is None or len(newline) != 1 or not header:
        raise InputError(f"the tokenizer has no {IM_END} token or no single newline token: not a Qwen chat tokenizer")
    return header, newline[0], end


def assistant_spans(ids: Sequence[int], processor) -> list[tuple[int, int]]:
    """[start, stop) of each assistant turn's trained tokens in one row of token ids: its content and
    closing <|im_end|>. A first content token that merges the header's newline with the content's
    own ("\\n\\n") holds content, so it is trained, as TRL's character-offset masks train it."""
    header, newline, end = _chat_tokens(processor)
    ids = list(ids)
    n, h = len(ids), len(header)
    spans = []
    i = 0
    while i <= n - h:
        if ids[i:i + h] != header:
            i += 1
            continue
        start = i + h + (1 if i + h < n and ids[i + h] == newline else 0)
        stop = start
        while stop < n and ids[stop] != end:
            stop += 1
        stop = min(stop + 1, n)  # the <|im_end|> is trained: the model must learn to stop
        spans.append((start, stop))
        i = stop
    return spans


def chat_labels(input_ids: np.ndarray, processor, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Labels [batch, length] for chat prompts: the token id inside assistant turns (content and
    closing <|im_end|>), -100 elsewhere, at padding, and where the previous token is padding (a
    prediction from a padding position, which the Trainer refuses)."""
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise InputError(f"input_ids must be [batch, length], got shape {list(input_ids.shape)}")
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    labels = np.full(input_ids.shape, IGNORE, np.int64)
    for r, row in enumerate(input_ids):
        for start, stop in assistant_spans(row.tolist(), processor):
            labels[r, start:stop] = row[start:stop]
    labels[mask == 0] = IGNORE
    labels[:, 1:][mask[:, :-1] == 0] = IGNORE
    return labels


# ----------------------------------------------------------------------------------------------------
# JSONL records


@dataclasses.dataclass(frozen=True)
class Record:
    """One conversation: messages in the HF chat format with media paths made absolute, and where it
    came from (for error messages)."""

    messages: list
    source: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.source}, line {self.line}"


def _check_media(item: dict, kind: str, base: Path, where: str) -> dict:
    keys = [k for k in (kind, "path", "url") if k in item]
    if not keys:
        raise InputError(f"{where}: {kind} item has no {kind!r} (or 'path') key")
    value = item[keys[0]]
    if not isinstance(value, str) or not value:
        raise InputError(f"{where}: {kind} item's {keys[0]!r} must be a file path, got {type(value).__name__}")
    if value.startswith(("http://", "https://")):
        raise InputError(f"{where}: {kind} URLs are not fetched ({value}); download the file and give its path")
    path = (base / value).expanduser() if not os.path.isabs(value) else Path(value)
    if kind == "image" and not path.is_file():
        raise InputError(f"{where}: image file not found: {path}")
    if kind == "video" and not (path.is_file() or path.is_dir()):
        raise InputError(f"{where}: no video file or frame directory {path}")
    out = {"type": kind, kind: str(path)}
    if kind == "video" and item.get("video_fps") is not None:
        fps = item["video_fps"]
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
            raise InputError(f"{where}: video_fps must be a positive number, got {fps!r}")
        out["video_fps"] = float(fps)
    return out


def _check_messages(messages, base: Path, where: str) -> list:
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: 'messages' must be a non-empty list of messages")
    out = []
    for m, message in enumerate(messages):
        at = f"{where}, message {m}"
        if not isinstance(message, dict):
            raise InputError(f"{at}: expected an object with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in _ROLES:
            raise InputError(f"{at}: role {role!r} is not one of {', '.join(_ROLES)}")
        content = message.get("content")
        message = dict(message)
        if isinstance(content, list):
            items = []
            for i, item in enumerate(content):
                ai = f"{at} ({role}), content item {i}"
                if not isinstance(item, dict):
                    raise InputError(f"{ai}: expected an object like {{\"type\": \"text\", \"text\": ...}}")
                kind = item.get("type")
                if kind not in _CONTENT_TYPES:
                    raise InputError(f"{ai}: unknown content type {kind!r}; expected text, image or video")
                if kind == "text":
                    if not isinstance(item.get("text"), str):
                        raise InputError(f"{ai}: 'text' must be a string")
                    items.append({"type": "text", "text": item["text"]})
                elif role == "assistant":
                    # The chat template writes only the text of assistant turns: media there would be dropped.
                    raise InputError(f"{ai}: assistant messages hold text only (the chat template drops {kind}s)")
                else:
                    items.append(_check_media(item, kind, base, ai))
            message["content"] = items
        elif not isinstance(content, str) and not (role == "assistant" and content is None
                                                   and message.get("tool_calls")):
            raise InputError(f"{at} ({role}): 'content' must be a string or a list of content items")
        out.append(message)
    if not any(m["role"] == "assistant" for m in out):
        raise InputError(f"{where}: no assistant message: nothing to learn from this record")
    return out


def read_jsonl(path: str | os.PathLike) -> list[Record]:
    """Records of a JSONL file: one JSON object {"messages": [...]} per line (blank lines skipped).
    Media paths are relative to the file's directory; every image must exist. A bad record is an
    InputError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no data file {path}")
    base = path.resolve().parent
    records = []
    try:
        with path.open(encoding="utf-8") as f:
            for n, text in enumerate(f, 1):
                if not text.strip():
                    continue
                where = f"{path}, line {n}"
                try:
                    obj = json.loads(text)
                except (ValueError, RecursionError) as e:
                    raise InputError(f"{where}: invalid JSON ({' '.join(str(e).split())})") from None
                if not isinstance(obj, dict):
                    raise InputError(f"{where}: expected an object {{\"messages\": [...]}}, got {type(obj).__name__}")
                if "messages" not in obj:
                    raise InputError(f"{where}: no 'messages' key")
                records.append(Record(_check_messages(obj["messages"], base, where), str(path), n))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not records:
        raise InputError(f"{path}: no records")
    return records


# ----------------------------------------------------------------------------------------------------
# batches


def _load_video(item: dict, where: str) -> dict:
    """A checked video item -> the same item holding its decoded frames and source frame rate (the
    record's video_fps, else the file's), as `qvl-jax generate` and the server read the file."""
    try:
        video = load_video(item["video"], item.get("video_fps"))
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    return dict(item, video=video.frames, **({"video_fps": video.fps} if video.fps is not None else {}))


def encode_record(record: Record, processor) -> dict[str, np.ndarray]:
    """One record -> the processor's arrays for it (one row, unpadded) plus its labels."""
    messages = [dict(m, content=[_load_video(it, record.where) if it["type"] == "video" else it
                                 for it in m["content"]]) if isinstance(m.get("content"), list) else m
                for m in record.messages]
    try:
        out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, padding=False)
    except InputError as e:
        raise InputError(f"{record.where}: {e}") from None
    ids = out["input_ids"][0].tolist()
    turns = sum(m["role"] == "assistant" for m in record.messages)
    found = len(assistant_spans(ids, processor))
    if found != turns:
        # A user text that spells out the assistant header would move the trained spans.
        raise InputError(f"{record.where}: found {found} assistant turns in the "
                         f"rendered prompt but the record has {turns} (does a message contain '{IM_START}'?)")
    out = {k: v for k, v in out.items() if k in _MODEL_INPUTS}
    out["labels"] = chat_labels(out["input_ids"], processor)
    return out


def collate(rows: list[dict[str, np.ndarray]], pad_token_id: int) -> dict[str, np.ndarray]:
    """Encoded rows -> one batch, padded on the right (as transformers' trainers pad); images and
    videos concatenated in row order, as the processor orders them for a batch."""
    longest = max(r["input_ids"].shape[1] for r in rows)
    out = {}
    for key, fill in (("input_ids", pad_token_id), ("attention_mask", 0), ("mm_token_type_ids", 0),
                      ("labels", IGNORE)):
        out[key] = np.stack([np.pad(r[key][0], (0, longest - r[key].shape[1]), constant_values=fill) for r in rows])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [r[key] for r in rows if key in r]
        if parts:
            out[key] = np.concatenate(parts)
    return out


def check_records(records: list[Record], processor, max_length: int | None = None) -> list[int]:
    """Encodes every record once, as its batch will encode it (each image and video decoded, the
    chat template rendered, the assistant turns found) and returns their token lengths: a record
    that cannot be read, or that is longer than `max_length` tokens, is an InputError naming its
    file and line before anything is trained. Records over the limit are refused, not truncated: a
    cut could split an image's tokens or drop every trained token of the record."""
    lengths = []
    for record in records:
        n = int(encode_record(record, processor)["input_ids"].shape[1])
        if max_length is not None and n > max_length:
            raise InputError(f"{record.where}: {n} tokens, more than --max-length {max_length}; shorten the record "
                             "(or its images) or raise --max-length")
        lengths.append(n)
    return lengths


def _filler(pad_token_id: int) -> dict[str, np.ndarray]:
    """A row that holds one padding token and no label: it fills the last batch of an epoch to the
    batch's size (one compiled shape) and adds exact zeros to the loss sum, the token count and
    every gradient, so that batch is the step on its real records alone (up to the order in which
    float32 sums run over a batch of another size)."""
    one = np.array([[pad_token_id]])
    return {"input_ids": one, "attention_mask": np.ones_like(one), "mm_token_type_ids": np.zeros_like(one),
            "labels": np.full_like(one, IGNORE, dtype=np.int64)}


class Batches:
    """Batches of `batch_size` records in a seeded order, endlessly: epoch e reads the records in
    the permutation drawn from (seed, e). An epoch is one pass over the records: ceil(records /
    batch_size) batches (`steps_per_epoch`), the last of which holds the remainder and is filled up
    with rows that carry no labels, so no batch runs on into the next epoch. `position` (records
    consumed so far) is the whole of the iterator's state: save it, and a new `Batches` given it
    continues exactly where this one stood."""

    def __init__(self, records: list[Record], processor, batch_size: int, seed: int = 0, position: int = 0,
                 shuffle: bool = True):
        if not records:
            raise InputError("no records to batch")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise InputError(f"position must be a non-negative integer, got {position!r}")
        self.records, self.processor = records, processor
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.position = position
        self._orders: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.records) // self.batch_size)

    @property
    def epoch(self) -> float:
        """Epochs completed so far (fractional: records consumed over records)."""
        return self.position / len(self.records)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self.records)
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                            else np.arange(n)}
        return self._orders[epoch]

    def indices(self, position: int | None = None) -> list[int]:
        """Record indices of the batch that starts at `position` (default: the next one): up to
        `batch_size` of them, fewer at the end of an epoch."""
        start = self.position if position is None else position
        n = len(self.records)
        stop = min(start + self.batch_size, (start // n + 1) * n)
        return [int(self._order(j // n)[j % n]) for j in range(start, stop)]

    def next(self) -> dict[str, np.ndarray]:
        """The next batch (processor arrays + labels, always `batch_size` rows); advances `position`
        (only once the batch is built: a failure leaves it where it was)."""
        take = self.indices()
        rows = [encode_record(self.records[i], self.processor) for i in take]
        rows += [_filler(self.processor.pad_token_id)] * (self.batch_size - len(take))
        batch = collate(rows, self.processor.pad_token_id)
        self.position += len(take)
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            yield self.next()


def eval_batches(records: list[Record], processor, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every record once, in file order, `batch_size` at a time (the last batch may be smaller)."""
    for i in range(0, len(records), batch_size):
        yield collate([encode_record(r, processor) for r in records[i:i + batch_size]], processor.pad_token_id)
