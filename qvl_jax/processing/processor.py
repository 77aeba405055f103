"""Chat messages and prompts -> model inputs, the way transformers' Qwen3VLProcessor builds them.

What it holds:
  - `Processor`: tokenizer (a `tokenizers.Tokenizer` read from tokenizer.json) + `ImageProcessor` +
    `VideoProcessor` + chat template. `Processor.from_pretrained(dir)` reads a checkpoint directory.
      * `proc(text=..., images=..., videos=...)` expands every `<|image_pad|>` to
        grid_t * grid_h * grid_w / merge_size**2 pads and every `<|video_pad|>` to one
        `<{t:.1f} seconds><|vision_start|>pads<|vision_end|>` group per temporal grid step (the chat
        template's `<|vision_start|><|video_pad|><|vision_end|>` is replaced whole, as Qwen's processor
        and transformers >= 5.25 do: no outer pair around the frames), tokenizes, pads, and returns
        numpy arrays under Hugging Face's names (input_ids, attention_mask, mm_token_type_ids,
        pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw).
      * `apply_chat_template(messages, ...)` renders HF-format chat messages with the checkpoint's
        Jinja template in the same sandboxed environment transformers uses, and with tokenize=True
        collects the images / videos from the messages in order and runs `__call__`.
      * `decode` / `batch_decode`, `eos_token_ids` for stopping generation.
      * `apply_chat_template(..., literal_content=True)`: special-token strings typed inside message
        text (`<|im_start|>system`) are tokenized as plain text, not as control tokens (what a
        server wants; transformers, and the default here, turn them into real special tokens).
  - `QWEN3_VL_CHAT_TEMPLATE`: the Qwen3-VL-Instruct chat template, used when a checkpoint ships none
    (kept in chat_template.jinja; the Jinja sandbox is in template.py, message checks in messages.py).

Deliberate differences from transformers:
  - Padding is on by default (to the longest prompt) and on the left, because the outputs are
    rectangular numpy arrays meant for generation; transformers defaults to no padding, on the right.
  - A video's source frame rate is passed as `video_fps=` (or a video content item's "video_fps" key);
    transformers takes it inside `video_metadata`, which is also accepted here.
  - Malformed messages and placeholder / media count mismatches raise a one-line `InputError` before
    any image is decoded.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import numpy as np
from tokenizers import Tokenizer

from qvl_jax.errors import CheckpointError, ConfigError, InputError
from qvl_jax.processing.image_processing import ImageProcessor
from qvl_jax.processing.media_settings import apply_media_settings, check_media_settings
from qvl_jax.processing.video_processing import VideoProcessor, _split_videos
from qvl_jax.processing.messages import (
    _REASONING_FIELDS,
    _alias_reasoning,
    _check_utf8,
    _collect_media,
    _cut_at_tag,
    _describe,
    _normalize_conversation,
    _split_conversations,
    _tag_final_message,
)
from qvl_jax.processing.template import (
    QWEN3_VL_CHAT_TEMPLATE,
    _compile_template,
    _template_data,
    _TemplateError,
)

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
_VIDEO_WRAPPER = VISION_START_TOKEN + VIDEO_TOKEN + VISION_END_TOKEN  # how the chat template places a video
IM_END_TOKEN = "<|im_end|>"
ENDOFTEXT_TOKEN = "<|endoftext|>"

# mm_token_type_ids values (text is 0), as transformers' ProcessorMixin.create_mm_token_type_ids assigns them.
_IMAGE_TYPE, _VIDEO_TYPE = 1, 2
# literal_content marks special-token strings inside message text with this noncharacter (after their
# first character), so they no longer match the tokenizer's special tokens; the mark is removed
# before the text between real special tokens is encoded.
_LITERAL_MARK = "\ufdd0"


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet: each byte is a printable character, the printable Latin-1 ones as
    themselves and the other 68 as code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    shifted = iter(range(256, 512))
    return {(chr(b) if b in keep else chr(next(shifted))): b for b in range(256)}


_BYTE_OF_CHAR = _byte_alphabet()


# ----------------------------------------------------------------------------------------------------
# checkpoint files


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or UTF-8, ints past Python's digit limit
        reason = " ".join(str(e).split())
        raise CheckpointError(f"cannot read {path}: {reason}") from None
    except RecursionError:
        raise CheckpointError(f"cannot read {path}: nested too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as strings, or as AddedToken dicts in older files
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(value: Any, source: str) -> str | None:
    # a template string, or a list of {"name", "template"} where "default" is the chat template
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        for entry in value:
            if isinstance(entry, Mapping) and entry.get("name") == "default":
                return entry.get("template")
        return None
    raise CheckpointError(f"{source}: chat_template must be a string, got {type(value).__name__}")


def _load_chat_template(model_dir: Path, tokenizer_config: dict) -> str:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {jinja_file}: {e}") from None
    json_file = model_dir / "chat_template.json"
    if json_file.is_file():
        template = _pick_template(_read_json(json_file).get("chat_template"), str(json_file))
        if template:
            return template
    template = _pick_template(tokenizer_config.get("chat_template"), str(model_dir / "tokenizer_config.json"))
    return template or QWEN3_VL_CHAT_TEMPLATE


# ----------------------------------------------------------------------------------------------------


def _ids_list(ids: Any, what: str) -> list[int]:
    arr = np.asarray(ids)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"{what} takes a 1-D sequence of token ids, got shape {arr.shape} dtype {arr.dtype}")
    return [int(i) for i in arr]


class Processor:
    """Qwen3-VL processor: text + images + videos -> model inputs, chat messages -> prompt, ids -> text.

    Build with `Processor.from_pretrained(model_dir)`; see the module docstring for the calls."""

    def __init__(
        self,
        tokenizer,
        image_processor: ImageProcessor | None = None,
        video_processor: VideoProcessor | None = None,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str | None] | None = None,
    ):
        """tokenizer: a `tokenizers.Tokenizer` holding Qwen's added tokens. special_tokens: the
        tokenizer_config.json names (eos_token, pad_token, bos_token, unk_token) -> token text, which
        templates may read and which set the pad id."""
        self.tokenizer = tokenizer
        self._token_bytes: dict[int, bytes] = {}  # token_bytes' cache, added tokens filled on first use
        # Padding and truncation are done here, explicitly; a tokenizer.json may carry either.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.image_processor = image_processor if image_processor is not None else ImageProcessor()
        self.video_processor = video_processor if video_processor is not None else VideoProcessor()
        self.chat_template = chat_template if chat_template is not None else QWEN3_VL_CHAT_TEMPLATE
        self.special_tokens = {k: v for k, v in dict(special_tokens or {}).items() if v is not None}
        self.special_tokens.setdefault("eos_token", IM_END_TOKEN)
        self.special_tokens.setdefault("pad_token", ENDOFTEXT_TOKEN)

        def required(token: str) -> int:
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ConfigError(f"the tokenizer has no {token} token; it is not a Qwen-VL tokenizer")
            return token_id

        self.image_token_id = required(IMAGE_TOKEN)
        self.video_token_id = required(VIDEO_TOKEN)
        self.vision_start_token_id = required(VISION_START_TOKEN)
        self.vision_end_token_id = required(VISION_END_TOKEN)
        self.pad_token_id = required(self.special_tokens["pad_token"])
        eos = [tokenizer.token_to_id(t) for t in (IM_END_TOKEN, ENDOFTEXT_TOKEN, self.special_tokens["eos_token"])]
        self._eos_token_ids = list(dict.fromkeys(i for i in eos if i is not None))
        if not self._eos_token_ids:
            raise ConfigError(f"the tokenizer has neither {IM_END_TOKEN} nor {ENDOFTEXT_TOKEN}")

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike) -> "Processor":
        """Reads tokenizer.json, tokenizer_config.json, the chat template (chat_template.jinja, else
        chat_template.json, else tokenizer_config.json's, else the built-in Qwen3-VL one) and
        preprocessor_config.json / video_preprocessor_config.json (defaults when absent).

        model: what `qvl_jax.load` takes: a checkpoint directory (Hugging Face or converted),
        "tiny-random" (the built-in model) or a hub id such as Qwen/Qwen3-VL-2B-Instruct."""
        try:
            model_dir = Path(model)
            if isinstance(model, str) and (model == "tiny-random" or not model_dir.exists()):
                from qvl_jax import hub  # lazy: hub is a floor above processing (pyproject ignore_imports)

                model_dir = hub.model_files(model, log=False)  # library calls stay quiet, as qvl_jax.load
            return cls._from_dir(model_dir)
        except PermissionError as e:
            raise CheckpointError(f"permission denied: {e.filename or e}") from None

    @classmethod
    def _from_dir(cls, model_dir: Path) -> Processor:
        if not model_dir.is_dir():
            raise CheckpointError(f"no such model directory: {model_dir}")
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(f"{model_dir} has no tokenizer.json (qvl_jax reads the fast tokenizer file)")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises plain Exception on malformed files
            reason = " ".join(str(e).split()) or type(e).__name__
            raise CheckpointError(f"cannot read {tokenizer_file}: {reason}") from None
        config_file = model_dir / "tokenizer_config.json"
        tokenizer_config = _read_json(config_file) if config_file.is_file() else {}
        special = {k: _token_content(tokenizer_config.get(k)) for k in ("bos_token", "eos_token", "pad_token",
                                                                         "unk_token")}
        image_file = model_dir / "preprocessor_config.json"
        video_file = model_dir / "video_preprocessor_config.json"
        image_processor = ImageProcessor.from_dict(_read_json(image_file)) if image_file.is_file() else None
        video_processor = VideoProcessor.from_dict(_read_json(video_file)) if video_file.is_file() else None
        return cls(tokenizer, image_processor, video_processor, _load_chat_template(model_dir, tokenizer_config),
                   special)

    # ------------------------------------------------------------------------------------------------

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end an answer: <|im_end|>, <|endoftext|> (and tokenizer_config's eos if another)."""
        return list(self._eos_token_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Plain tokenization of one string, no placeholder expansion."""
        if not isinstance(text, str):
            raise InputError(f"text must be a string, got {_describe(text)}")
        _check_utf8(text, "text")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Token ids (1-D) -> text; no stopping at eos (the caller trims)."""
        return self.tokenizer.decode(_ids_list(ids, "decode"), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a token may hold part of a UTF-8 character): what OpenAI's
        logprobs report as `bytes`. Added tokens are their text; byte-level BPE tokens map back
        through the byte alphabet; other tokenizers fall back to the decoded text."""
        cache = self._token_bytes
        if token_id not in cache:
            if not cache:  # first call: the added tokens' texts
                cache.update((i, t.content.encode()) for i, t in self.tokenizer.get_added_tokens_decoder().items())
                if token_id in cache:
                    return cache[token_id]
            piece = self.tokenizer.id_to_token(int(token_id))
            if piece is not None and type(self.tokenizer.decoder).__name__ == "ByteLevel" and \
                    all(ch in _BYTE_OF_CHAR for ch in piece):
                cache[token_id] = bytes(_BYTE_OF_CHAR[ch] for ch in piece)
            else:
                cache[token_id] = self.tokenizer.decode([int(token_id)], skip_special_tokens=False).encode()
        return cache[token_id]

    def batch_decode(self, ids: Any, skip_special_tokens: bool = True) -> list[str]:
        """A batch of id sequences ([B, T] array or list of lists) -> list of texts."""
        if isinstance(ids, np.ndarray) and ids.ndim != 2:
            raise InputError(f"batch_decode takes a [batch, length] array, got shape {ids.shape}")
        rows = [_ids_list(row, "batch_decode") for row in ids]
        return self.tokenizer.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------------

    def _image_replacements(self, grids: np.ndarray) -> list[str]:
        merge = self.image_processor.merge_size ** 2
        return [IMAGE_TOKEN * (int(np.prod(g)) // merge) for g in grids]

    def _video_replacements(self, grids: np.ndarray, metadata: list) -> list[str]:
        merge = self.video_processor.merge_size ** 2
        out = []
        for (t, h, w), meta in zip(grids, metadata):
            seconds = meta.timestamps(self.video_processor.temporal_patch_size)
            frame = VISION_START_TOKEN + VIDEO_TOKEN * (int(h) * int(w) // merge) + VISION_END_TOKEN
            out.append("".join(f"<{seconds[k]:.1f} seconds>" + frame for k in range(int(t))))
        return out

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        videos: Any = None,
        *,
        video_fps: float | Sequence[float | None] | None = None,
        video_metadata: Sequence[Any] | None = None,
        padding: bool | str = True,
        padding_side: str = "left",
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        fps: float | None = None,
        num_frames: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Prompt text(s) with one `<|image_pad|>` / `<|video_pad|>` per image / video (as the chat
        template writes them) -> dict of numpy arrays under transformers' names.

        images: one image or a (nested) list, taken in order across the batch. videos: one video or a
        list ([T, H, W, C] uint8 arrays or lists of frames). video_fps: source frame rate (one, or one
        per video); video_metadata: transformers' alternative, a list of dicts with "fps".
        min_pixels / max_pixels (images), fps / num_frames (video sampling): this call's media
        settings in place of the configured ones (see media_settings.py)."""
        return self._call(text, images, videos, video_fps=video_fps, video_metadata=video_metadata, padding=padding,
                          padding_side=padding_side, add_special_tokens=add_special_tokens,
                          return_tensors=return_tensors,
                          media=dict(min_pixels=min_pixels, max_pixels=max_pixels, fps=fps, num_frames=num_frames))

    def _call(self, text=None, images=None, videos=None, *, video_fps=None, video_metadata=None, padding=True,
              padding_side="left", add_special_tokens=True, return_tensors=None, literal=False,
              media=None) -> dict:
        """`__call__`; literal: the text was marked by `_mark_message` (apply_chat_template's literal_content);
        media: the media settings (min_pixels, max_pixels, fps, num_frames; None values: the configured ones)."""
        settings = check_media_settings(media, self.image_processor, self.video_processor)
        image_processor, video_processor = apply_media_settings(settings, self.image_processor, self.video_processor)
        if return_tensors not in (None, "np"):
            raise InputError(f"return_tensors={return_tensors!r}: qvl_jax returns numpy arrays only (use 'np')")
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if padding not in (True, False, "longest", "do_not_pad"):
            raise InputError(f"padding must be True/'longest' or False/'do_not_pad', got {padding!r}")
        texts = self._check_text(text)
        image_list = _flat_images(images)
        video_list = _split_videos(videos) if videos is not None else []
        video_fps = self._video_rates(video_fps, video_metadata, len(video_list))
        if texts is None:
            if not image_list and not video_list:
                raise InputError("nothing to process: pass text, images or videos")
        else:
            self._check_counts(texts, IMAGE_TOKEN, "image", len(image_list))
            self._check_counts(texts, VIDEO_TOKEN, "video", len(video_list))

        out: dict[str, np.ndarray] = {}
        replacements: dict[str, list[str]] = {}
        if image_list:
            pixels = image_processor(image_list)
            out["pixel_values"], out["image_grid_thw"] = pixels["pixel_values"], pixels["image_grid_thw"]
            replacements[IMAGE_TOKEN] = self._image_replacements(pixels["image_grid_thw"])
        if video_list:
            frames = video_processor(video_list, video_fps=video_fps)
            out["pixel_values_videos"], out["video_grid_thw"] = frames["pixel_values_videos"], frames["video_grid_thw"]
            replacements[VIDEO_TOKEN] = self._video_replacements(frames["video_grid_thw"], frames["video_metadata"])
        if texts is None:
            return out
        return {**self._tokenize(self._expand(texts, replacements), padding, padding_side, add_special_tokens,
                                 literal), **out}

    def _check_text(self, text: Any) -> list[str] | None:
        if text is None:
            return None
        if isinstance(text, str):
            return [_check_utf8(text, "text")]
        if isinstance(text, (list, tuple)):
            if not text:
                raise InputError("text is an empty list")
            for i, t in enumerate(text):
                if not isinstance(t, str):
                    raise InputError(f"text must be a string or a list of strings; item {i} is {_describe(t)}")
                _check_utf8(t, f"text {i}")
            return list(text)
        raise InputError(f"text must be a string or a list of strings, got {_describe(text)}")

    @staticmethod
    def _check_counts(texts: list[str], token: str, what: str, given: int) -> None:
        found = sum(t.count(token) for t in texts)
        if found != given:
            raise InputError(
                f"the text has {found} {token} placeholder(s) but {given} {what}(s) were given; each {what} "
                f"needs exactly one {token} in the text (the chat template writes them)"
            )

    @staticmethod
    def _video_rates(video_fps: Any, video_metadata: Any, n: int) -> Any:
        if video_metadata is None:
            return video_fps
        if video_fps is not None:
            raise InputError("pass the source frame rate as video_fps or video_metadata, not both")
        metadata = [video_metadata] if isinstance(video_metadata, Mapping) else list(video_metadata)
        if len(metadata) != n:
            raise InputError(f"got {n} video(s) but {len(metadata)} video_metadata entries")
        return [m.get("fps") if isinstance(m, Mapping) else getattr(m, "fps", None) for m in metadata]

    @staticmethod
    def _expand(texts: list[str], replacements: dict[str, list[str]]) -> list[str]:
        """Each placeholder, in order across the batch, replaced by its image's / video's expansion.

        A video's expansion wraps every frame in `<|vision_start|>...<|vision_end|>`, so where the
        chat template wrote `<|vision_start|><|video_pad|><|vision_end|>` the whole wrapper is replaced
        (Qwen's own processor does this; transformers 5.0-5.24 kept the outer pair, 5.25 restored it)."""
        if not replacements:
            return texts
        pending = {token: iter(reps) for token, reps in replacements.items()}
        alternatives = [re.escape(token) for token in replacements]
        if VIDEO_TOKEN in replacements:  # the wrapped form first, so that it wins over the bare token
            alternatives.insert(0, re.escape(_VIDEO_WRAPPER))

        def expansion(match: re.Match) -> str:
            token = VIDEO_TOKEN if match.group() == _VIDEO_WRAPPER else match.group()
            return next(pending[token])

        pattern = re.compile("|".join(alternatives))
        return [pattern.sub(expansion, t) for t in texts]

    def _tokenize(self, texts: list[str], padding, padding_side: str, add_special_tokens: bool,
                  literal: bool = False) -> dict:
        if literal:
            rows = [self._encode_literal(t, add_special_tokens) for t in texts]
        else:
            rows = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]
        for i, row in enumerate(rows):
            if not row:
                raise InputError(f"text {i} is empty: it encodes to no tokens, and the model needs at least one")
        for row, t in zip(rows, texts):
            for token, token_id in ((IMAGE_TOKEN, self.image_token_id), (VIDEO_TOKEN, self.video_token_id)):
                if row.count(token_id) != t.count(token):
                    raise ConfigError(f"the tokenizer does not encode {token} as the single id {token_id}")
        longest = max(len(r) for r in rows)
        if padding in (False, "do_not_pad") and any(len(r) != longest for r in rows):
            raise InputError(
                f"prompts have different lengths ({sorted({len(r) for r in rows})} tokens) and padding=False; "
                "pass padding=True to pad them into one array"
            )
        input_ids = np.full((len(rows), longest), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), longest), dtype=np.int64)
        for b, row in enumerate(rows):
            cols = slice(longest - len(row), longest) if padding_side == "left" else slice(0, len(row))
            input_ids[b, cols] = row
            attention_mask[b, cols] = 1
        mm_token_type_ids = np.zeros_like(input_ids)
        mm_token_type_ids[input_ids == self.image_token_id] = _IMAGE_TYPE
        mm_token_type_ids[input_ids == self.video_token_id] = _VIDEO_TYPE
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids}

    # ------------------------------------------------------------------------------------------------
    # literal_content: user text whose special-token strings stay plain text

    @functools.cached_property
    def _literal_tools(self):
        """(regex over the special tokens' strings, longest first; a copy of the tokenizer that
        encodes special-token strings as plain text; the ids add_special_tokens puts before and after)."""
        specials = sorted((t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special),
                          key=len, reverse=True)
        pattern = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        plain = Tokenizer.from_str(self.tokenizer.to_str())
        plain.encode_special_tokens = True  # a copy: the shared tokenizer's flag would race across threads
        bare, full = self.tokenizer.encode("a", add_special_tokens=False).ids, self.tokenizer.encode("a").ids
        at = full.index(bare[0]) if bare and bare[0] in full else 0
        return pattern, plain, full[:at], full[at + len(bare):]

    def _mark(self, text: str, where: str) -> str:
        if _LITERAL_MARK in text:
            raise InputError(f"{where} contains U+FDD0, a Unicode noncharacter that text may not hold")
        pattern = self._literal_tools[0]
        return text if pattern is None else pattern.sub(lambda m: m.group()[0] + _LITERAL_MARK + m.group()[1:], text)

    def _mark_message(self, message: dict) -> dict:
        message = dict(message)
        role = message.get("role")
        for key in ("content",) + _REASONING_FIELDS:
            value = message.get(key)
            if isinstance(value, str):
                message[key] = self._mark(value, f"{role} message {key}")
            elif key == "content" and isinstance(value, list):
                message[key] = [dict(item, text=self._mark(item["text"], f"{role} message text"))
                                if isinstance(item.get("text"), str) else item for item in value]
        return message

    def _encode_literal(self, text: str, add_special_tokens: bool) -> list[int]:
        """Ids of a marked prompt: unmarked special-token strings (the template's own) are special
        tokens; the text between them, mark removed, is encoded with special-token matching off."""
        pattern, plain, before, after = self._literal_tools
        parts = [text] if pattern is None else pattern.split(text)
        ids: list[int] = list(before) if add_special_tokens else []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self.tokenizer.token_to_id(part))
            elif part:
                ids += plain.encode(part.replace(_LITERAL_MARK, ""), add_special_tokens=False).ids
        return ids + (list(after) if add_special_tokens else [])

    # ------------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Any,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        *,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        continue_final_message: bool = False,
        padding: bool | str = True,
        padding_side: str = "left",
        literal_content: bool = False,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        fps: float | None = None,
        num_frames: int | None = None,
        **template_kwargs,
    ):
        """HF chat messages (one conversation, or a list of conversations) -> prompt.

        tokenize=False: the rendered prompt (a str, or a list for a batch). tokenize=True: with
        return_dict the full `__call__` output for the rendered prompt(s) and the messages' images /
        videos, else only input_ids. Extra keyword arguments are template variables (e.g.
        add_vision_id=True), as in transformers. A video item may carry "video_fps" (its source
        frame rate; 24 when absent, as in transformers). continue_final_message=True leaves the last
        message open (no end-of-turn after its text) so that generation continues it.
        literal_content=True: special-token strings typed in message text stay plain text (a user
        cannot forge a turn); the default turns them into special tokens, as transformers does.
        min_pixels / max_pixels (images), fps / num_frames (video sampling): this call's media settings
        (vLLM's mm_processor_kwargs), checked before any template is rendered or image decoded."""
        media = check_media_settings(dict(min_pixels=min_pixels, max_pixels=max_pixels, fps=fps, num_frames=num_frames),
                                     self.image_processor, self.video_processor)
        if continue_final_message and add_generation_prompt:
            raise InputError("continue_final_message and add_generation_prompt cannot both be set: the first "
                             "continues the last message, the second starts a new assistant message")
        conversations, batched = _split_conversations(messages)
        conversations = [_normalize_conversation(conv, c, batched) for c, conv in enumerate(conversations)]
        if literal_content:
            conversations = [[self._mark_message(m) for m in conv] for conv in conversations]
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)):
            raise InputError("tools must be a list of JSON-schema dicts")
        if documents is not None and not (
            isinstance(documents, list) and all(isinstance(d, Mapping) for d in documents)
        ):
            raise InputError("documents must be a list of dicts with 'title' and 'text'")
        template = _compile_template(chat_template if chat_template is not None else self.chat_template)
        variables = _template_data({**self.special_tokens, **template_kwargs})
        prompts = []
        for conversation in conversations:
            chat = [_alias_reasoning(m) for m in _template_data(conversation)]
            final_text = _tag_final_message(chat) if continue_final_message else None
            try:
                prompt = template.render(
                    messages=chat, tools=_template_data(tools), documents=_template_data(documents),
                    add_generation_prompt=add_generation_prompt, **variables,
                )
            except _TemplateError as e:
                raise InputError(f"the chat template rejected the messages: {e}") from None
            except jinja2.TemplateError as e:
                raise InputError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None
            prompts.append(prompt if final_text is None else _cut_at_tag(prompt, final_text))
        if not tokenize:
            return prompts if batched else prompts[0]

        images, videos, rates = _collect_media(conversations)
        for token, what, given in ((IMAGE_TOKEN, "image", len(images)), (VIDEO_TOKEN, "video", len(videos))):
            found = sum(p.count(token) for p in prompts)
            if found != given:
                raise InputError(
                    f"the messages hold {given} {what} item(s) but the chat template wrote {found} {token} "
                    f"placeholder(s) (this template renders {what}s only in some roles' messages)"
                )
        bos = self.special_tokens.get("bos_token")
        # the template already wrote the BOS token, so the tokenizer must not add another (transformers)
        add_special_tokens = not (bos and prompts[0].startswith(bos))
        out = self._call(
            text=prompts,
            images=images or None,
            videos=videos or None,
            video_fps=rates if any(r is not None for r in rates) else None,
            padding=padding,
            padding_side=padding_side,
            add_special_tokens=add_special_tokens,
            literal=literal_content,
            media=media,
        )
        return out if return_dict else out["input_ids"]


def _flat_images(images: Any) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        out = []
        for x in images:
            out.extend(_flat_images(x))
        return out
    return [images]


__all__ = ["Processor", "QWEN3_VL_CHAT_TEMPLATE"]
