"""A small but real Qwen-style tokenizer, written to disk for the built-in tiny checkpoint and for tests.

`write_tiny_tokenizer(out_dir, vocab_size=512)` writes the three files a Qwen3-VL checkpoint carries for
its text side:
  - tokenizer.json: byte-level BPE in the layout of Qwen's own file (NFC normaliser, Qwen's split regex,
    byte-level pre-tokenizer / post-processor / decoder, no unknown token), so any UTF-8 text encodes;
    ids 0..255 are the 256 bytes, then merges learnt from a small built-in corpus, then Qwen's added
    tokens (<|endoftext|>, <|im_start|>, <|im_end|>, ..., <|image_pad|>, <|video_pad|>, <think>, ...) in
    Qwen's order and with Qwen's special flags;
  - tokenizer_config.json: what Qwen3-VL ships (Qwen2Tokenizer, eos <|im_end|>, pad <|endoftext|>,
    added_tokens_decoder), so transformers' AutoTokenizer loads the directory to the same ids;
  - chat_template.jinja: the Qwen3-VL-Instruct chat template (`template.QWEN3_VL_CHAT_TEMPLATE`).

The merges come from a tiny BPE learner written here rather than `tokenizers`' trainer, so the same
vocab_size always gives the same ids, whatever the installed `tokenizers` version breaks ties by.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from qvl_jax.processing.template import QWEN3_VL_CHAT_TEMPLATE

# The split regex of Qwen2/2.5/3 tokenizer.json files (and of transformers' Qwen2Tokenizer).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3-VL's added tokens in id order, with their `special` flag: skip_special_tokens drops only the
# special ones, so <think> or <tool_call> survive decoding, as they do with the real tokenizer.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

_BYTES = 256

# Text the merges are learnt from: enough distinct words for a few hundred merges, in the register of
# the prompts the tiny model sees (describing images and videos), plus some digits and punctuation.
_CORPUS = """
You are a helpful assistant. Describe this image in detail. What is shown in the picture? The picture
shows a small red house next to a tall green tree, under a bright blue sky with white clouds. A black
cat is sitting on the wooden fence in front of the house, and two children are playing with a yellow
ball on the grass. Please describe the video. In the first seconds of the video a person walks along
the street, then turns left at the corner and enters a shop. The camera follows them inside, where
shelves are full of bread, fruit, vegetables and bottles of water. Count the objects in the image:
there are three apples, four oranges and one banana on the table. Read the text in the image and
answer the question. The sign says "Open from 9:00 to 17:30, Monday to Friday". Which animal is
larger, the dog or the horse? The horse is larger than the dog. Where is the boat? The boat is on the
river, near the bridge, and the water is calm. Explain what happens between the two frames: the
light changes from green to red and the cars stop. Answer with a single word. Yes. No. Maybe. Thank
you! Compare the two images and list their differences. The first image was taken during the day and
the second one at night; the colors, the shadows and the number of people are different.
def main(args):
    for index, value in enumerate(values):
        print(f"{index}: {value}")
    return 0
{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hello world"}]}
0 1 2 3 4 5 6 7 8 9 10 12 16 24 32 64 100 128 256 512 1024 2025 3.14 0.5 1.0 seconds
"""


def _bytes_to_unicode() -> list[tuple[int, str]]:
    """GPT-2's byte <-> printable character table, in the order Qwen numbers its first 256 tokens:
    the bytes that are printable Latin-1 characters first, then the rest mapped to U+0100 onwards."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    table = [(b, chr(b)) for b in printable]
    extra = 0
    for b in range(_BYTES):
        if b not in printable:
            table.append((b, chr(_BYTES + extra)))
            extra += 1
    return table


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


def _learn_merges(n_tokens: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte vocab plus up to `n_tokens - 256` merged tokens, learnt greedily from _CORPUS: the most
    frequent adjacent pair wins, ties go to the smallest pair, so the result is fully determined."""
    vocab = {ch: i for i, (_, ch) in enumerate(_bytes_to_unicode())}
    pieces = [p for p, _ in _pre_tokenizer().pre_tokenize_str(normalizers.NFC().normalize_str(_CORPUS))]
    words = collections.Counter(tuple(p) for p in pieces)
    merges: list[tuple[str, str]] = []
    while len(vocab) < n_tokens:
        pairs: collections.Counter = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        vocab.setdefault(joined, len(vocab))
        merged: collections.Counter = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return vocab, merges


def build_tiny_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """The tokenizers.Tokenizer that write_tiny_tokenizer saves (every id < vocab_size)."""
    n_added = len(QWEN_ADDED_TOKENS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < _BYTES + n_added:
        raise ValueError(f"vocab_size must be an integer >= {_BYTES + n_added} (256 bytes + {n_added} added "
                         f"tokens), got {vocab_size!r}")
    vocab, merges = _learn_merges(vocab_size - n_added)
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                   end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # one at a time, so each gets the next id in Qwen's order
    for content, special in QWEN_ADDED_TOKENS:
        tok.add_tokens([AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False,
                                   single_word=False)])
    return tok


def _tokenizer_config(tok: Tokenizer) -> dict:
    decoder = {}
    for content, special in QWEN_ADDED_TOKENS:
        decoder[str(tok.token_to_id(content))] = {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special,
        }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [c for c, special in QWEN_ADDED_TOKENS if special and c != "<|endoftext|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512) -> dict:
    """Writes tokenizer.json, tokenizer_config.json and chat_template.jinja into out_dir (created if
    needed) and returns the ids a config.json / generation_config.json needs: image_token_id,
    video_token_id, vision_start_token_id, vision_end_token_id, eos_token_id ([im_end, endoftext]),
    pad_token_id, bos_token_id (None, as Qwen) and the ids of <|im_start|> / <|im_end|> / <|endoftext|>."""
    tok = build_tiny_tokenizer(vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tok), indent=2) + "\n")
    (out / "chat_template.jinja").write_text(QWEN3_VL_CHAT_TEMPLATE)
    ids = {content: tok.token_to_id(content) for content, _ in QWEN_ADDED_TOKENS}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "bos_token_id": None,
        "im_start_token_id": ids["<|im_start|>"],
        "im_end_token_id": ids["<|im_end|>"],
        "endoftext_token_id": ids["<|endoftext|>"],
    }


__all__ = ["QWEN_ADDED_TOKENS", "QWEN_PRETOKENIZE_REGEX", "build_tiny_tokenizer", "write_tiny_tokenizer"]
