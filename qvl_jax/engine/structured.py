"""Structured outputs: grammars that constrain a row's tokens, through llguidance.

`StructuredOutputs` is what a request asks for (vLLM's names: exactly one of `json` (a JSON schema),
`json_object`, `regex`, `choice` (a list of strings) or `grammar` (Lark, or GBNF / EBNF as llama.cpp
writes it)); `SamplingParams(structured=...)` takes one, or a dict of those fields.

A `Compiler` holds llguidance's view of one tokenizer (the real token strings of our byte-level BPE,
read from the checkpoint's tokenizer.json, padded to the model's vocabulary) and turns a request into
a checked grammar (`compile`: an InputError naming the problem, before any work). Each constrained
row gets a `Matcher`, which lives on the host: after each token is known it is consumed, and the
mask of the tokens allowed next is written into a packed int32 bitmask row (vocab / 32 words, bit
i % 32 of word i // 32 for token i), which the jitted sampler unpacks and applies to the logits
(`sampling.allowed`). llguidance allows the end-of-sequence ids (the request's stop ids) exactly where
the grammar may end, and only them once it must.

Why llguidance (measured with `scripts/bench_mask.py`, numbers in docs/performance.md): its mask
fill and xgrammar's are both a few microseconds a token on a 151,936-entry vocabulary, far below a
decode step; llguidance compiles a JSON schema >10x faster (per-request latency), reads a
tokenizer.json directly and has no runtime dependencies, where xgrammar needs torch, triton and
transformers at runtime.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np

from qvl_jax.errors import InputError

KINDS = ("json", "json_object", "regex", "choice", "grammar")

# JSON as json.dumps writes it (and Qwen models answer): ", " and ": ", no other whitespace (a
# schema's own "x-guidance" options override these).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclasses.dataclass(frozen=True)
class StructuredOutputs:
    """One constraint on the answer (exactly one field set). json: a JSON schema (a dict, or its
    JSON text); json_object: any JSON object; regex: the whole answer matches it; choice: the answer
    is one of these strings; grammar: a Lark grammar (llguidance's dialect) or a GBNF one."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple | None = None
    grammar: str | None = None

    def __post_init__(self):
        put = functools.partial(object.__setattr__, self)
        if self.json is not None:
            schema = self.json
            if isinstance(schema, (str, bytes)):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise InputError(f"structured json: the schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise InputError(f"structured json must be a JSON schema (an object), got {type(schema).__name__}")
            put("json", json.dumps(schema))  # key order kept: properties come out in the schema's order
        if not isinstance(self.json_object, (bool, np.bool_)):
            raise InputError(f"structured json_object must be true or false, got {self.json_object!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InputError(f"structured {name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if (isinstance(self.choice, (str, bytes)) or not isinstance(self.choice, (list, tuple))
                    or not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
                raise InputError(f"structured choice must be a non-empty list of non-empty strings, got {self.choice!r}")
            put("choice", tuple(self.choice))
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InputError(f"structured outputs take exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(given) if given else 'none'}")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @classmethod
    def of(cls, value) -> "StructuredOutputs":
        """From a StructuredOutputs or a dict of its fields (InputError for anything else)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise InputError(f"structured must be a qvl_jax.StructuredOutputs or a dict with one of "
                             f"{', '.join(KINDS)}, got {type(value).__name__}")
        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise InputError(f"unknown structured output kind(s): {', '.join(map(str, unknown))} (known: "
                             f"{', '.join(KINDS)})")
        return cls(**value)

    def grammar_text(self) -> str:
        """The llguidance grammar (not yet checked against a tokenizer)."""
        import llguidance

        kind = self.kind
        try:
            if kind == "json":
                return llguidance.LLMatcher.grammar_from_json_schema(self.json, defaults=JSON_OPTIONS)
            if kind == "json_object":
                return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
            if kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(self.regex)
            if kind == "choice":
                return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
            return llguidance.grammar_from("grammar", self.grammar)
        except ValueError as e:
            raise InputError(f"structured {kind}: {_one_line(str(e))}") from None


    def after_reasoning(self, close_id: int) -> "StructuredOutputs":
        """The same constraint on the part of the answer after a Thinking model's reasoning: any
        text, the `</think>` token (close_id), newlines, then this answer. A `grammar` stays on the
        whole answer (its own start rule cannot be wrapped safely)."""
        kind = self.kind
        if kind == "grammar":
            return self
        if kind in ("json", "json_object"):
            schema = json.loads(self.json) if kind == "json" else {"type": "object"}
            if isinstance(schema, dict):
                schema = {**schema, "x-guidance": {**JSON_OPTIONS, **schema.get("x-guidance", {})}}
            body = "%json " + json.dumps(schema)
        elif kind == "regex":
            body = "/" + self.regex.replace("/", "\\/") + "/"
        else:
            body = " | ".join(json.dumps(c) for c in self.choice)
        return StructuredOutputs(grammar=f'start: /(?s:.*)/ <[{int(close_id)}]> "\\n"* answer\nanswer: {body}\n')


def _one_line(msg: str) -> str:
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    return " ".join(lines)[:500] if lines else "invalid"


def mask_words(vocab: int) -> int:
    """int32 words of one row's packed mask."""
    return (vocab + 31) // 32


class Matcher:
    """One row's grammar state (host): `fill` the mask of the next token, `consume` the chosen one."""

    def __init__(self, tokenizer, grammar: str, vocab: int, added: tuple[int, ...] = ()):
        import llguidance

        self.vocab = vocab  # the model's vocabulary (the mask's width)
        self.added = added
        self._m = llguidance.LLMatcher(tokenizer, grammar)

    def fill(self, row: np.ndarray) -> None:
        """Writes the allowed-next mask into row (int32 [words], C-contiguous).

        llguidance consumes an added token (<think>, <tool_call>, ...) as a special token, matched
        only by a grammar's <[id]>, but its mask may allow one whose text the grammar expects next
        (e.g. a regex spelling "</think>"): such bits are cleared here, so that the mask never allows
        a token the matcher then refuses."""
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        bits = row.view(np.uint32)
        for t in self.added:
            if (bits[t >> 5] >> np.uint32(t & 31)) & 1 and not self._m.validate_tokens([t]):
                bits[t >> 5] &= ~np.uint32(1 << (t & 31))

    def consume(self, tokens) -> None:
        """Advances over tokens; a token the grammar refuses is an InputError (a mask was not obeyed)."""
        for t in tokens:
            if not self._m.consume_token(int(t)):
                raise InputError(f"structured output: token {int(t)} breaks the grammar "
                                 f"({_one_line(self._m.get_error())})")

    @property
    def accepting(self) -> bool:
        return self._m.is_accepting()


def masks(matchers: list, rows: int, vocab: int) -> np.ndarray:
    """[rows, words] int32: each matcher's mask; all ones for rows without one (and past the list)."""
    out = np.full((rows, mask_words(vocab)), -1, np.int32)
    for i, m in enumerate(matchers):
        if m is not None:
            m.fill(out[i])
    return out


class Compiler:
    """llguidance's tokenizer for one vocabulary and set of end ids; compiles requests' grammars."""

    def __init__(self, tokenizer_json: str, vocab: int, eos: tuple[int, ...]):
        import llguidance

        self.vocab = vocab
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=list(eos))
        # Added tokens (not the end ids, which llguidance allows where the grammar may end).
        self.added = tuple(t["id"] for t in json.loads(tokenizer_json).get("added_tokens", [])
                           if t["id"] < vocab and t["id"] not in eos)

    def compile(self, so: StructuredOutputs) -> str:
        """The checked grammar text (InputError naming the problem when llguidance refuses it)."""
        import llguidance

        grammar = so.grammar_text()
        err = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if err and not err.startswith("WARNING"):
            raise InputError(f"structured {so.kind}: {_one_line(err)}")
        return grammar

    def matcher(self, grammar: str) -> Matcher:
        return Matcher(self.tokenizer, grammar, self.vocab, self.added)


@functools.lru_cache(maxsize=8)
def compiler(tokenizer_json: str, vocab: int, eos: tuple[int, ...]) -> Compiler:
    """The Compiler of a tokenizer (its JSON text), vocabulary size and end ids (built once: ~0.5 s
    for a 151k vocabulary)."""
    return Compiler(tokenizer_json, vocab, eos)


def for_request(tokenizer_json: str, vocab: int, so: StructuredOutputs, stop_ids) -> "Grammar":
    """A request's compiled grammar: its end ids are the request's stop ids (at least one: an
    answer the grammar completes must be able to end)."""
    eos = tuple(int(t) for t in np.asarray(stop_ids).ravel() if t >= 0)
    if not eos:
        raise InputError("structured outputs need a stop token id to end the answer (ignore_eos without "
                         "stop_token_ids leaves none)")
    c = compiler(tokenizer_json, vocab, eos)
    return Grammar(c, c.compile(so))


@dataclasses.dataclass(frozen=True)
class Grammar:
    """A checked grammar and its compiler: `matcher()` starts a row."""

    compiler: Compiler
    text: str

    def matcher(self) -> Matcher:
        return self.compiler.matcher(self.text)


@functools.lru_cache(maxsize=4)
def tokenizer_json(path: str) -> str:
    """The tokenizer of a checkpoint directory as a tokenizers JSON text (as our Processor reads it)."""
    from qvl_jax.processing.processor import Processor

    return Processor.from_pretrained(path).tokenizer.to_str()
