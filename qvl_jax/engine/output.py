"""Output processing, host-only: token ids -> text deltas, stop strings, finish reasons.

One place for what the server, the CLI and `Engine.generate(stop=...)` do with new tokens (as vLLM
v1's output processor): an incremental detokenizer that does work per token bounded by the token's
bytes (it never re-decodes the answer), a stop-string matcher that looks only at the tail that can
still hold a match, and `OutputStream`, which joins them for one answer. The text it produces for a
token list equals `Processor.decode(tokens, skip_special_tokens=True)` (with the stop token left out),
cut before the first stop string.

    table = TokenTable.of(processor)                # once per processor; caches each id's bytes
    out = OutputStream(table, stop=["\\n\\n"], stop_token_ids=processor.eos_token_ids)
    for toks in handle: sys.stdout.write(out.add(toks)); if out.finish_reason: break
    sys.stdout.write(out.finish("length"))
"""

from __future__ import annotations

import codecs
from typing import Callable, Iterable, NamedTuple

from qvl_jax.errors import InputError

# OpenAI documents up to 4 stop sequences and vLLM sets no bound; this server took up to 16 before the
# bound was written down, so 16 it stays. The length bound keeps the per-token work of holding back a
# possible stop-string start (a few comparisons per held character) small.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


def check_stop(stop: str | Iterable[str] | None) -> tuple[str, ...]:
    """Validated stop strings (a string or a list of them): at most MAX_STOP_STRINGS, each non-empty
    and at most MAX_STOP_CHARS characters. Raises a one-line InputError naming the problem."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise InputError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
    for s in stops:
        if not isinstance(s, str):
            raise InputError(f"stop strings must be strings, got {type(s).__name__}")
        if not s:
            raise InputError("stop strings must be non-empty")
        if len(s) > MAX_STOP_CHARS:
            raise InputError(f"a stop string is at most {MAX_STOP_CHARS} characters, got one of {len(s)}")
    return stops


class TokenTable:
    """id -> the bytes it adds to the answer's text: its bytes (`Processor.token_bytes`), or nothing
    for a special token, which `decode(skip_special_tokens=True)` drops (non-special added tokens such
    as <think> stay, as in the decode). Cached per id; safe to share across threads."""

    def __init__(self, piece: Callable[[int], bytes]):
        self._piece = piece
        self._cache: dict[int, bytes] = {}

    @classmethod
    def of(cls, processor) -> "TokenTable":
        """From a Processor, through its public decode and token_bytes: a token whose own decode is
        empty with skip_special_tokens=True is skipped (a special token, or an id past the vocab)."""
        def piece(t: int) -> bytes:
            return processor.token_bytes(t) if processor.decode([t], skip_special_tokens=True) else b""
        return cls(piece)

    def __call__(self, token_id: int) -> bytes:
        b = self._cache.get(token_id)
        if b is None:
            b = self._cache[token_id] = self._piece(token_id)
        return b


class IncrementalDetokenizer:
    """Fed token ids, returns text deltas. Byte-level BPE tokens can split a UTF-8 character: its first
    bytes are held (at most 3) until the rest come; bytes that can never form a character become
    U+FFFD, as the tokenizer's lossy decode makes them."""

    def __init__(self, table: TokenTable):
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._table(token_id))

    def flush(self) -> str:
        """The end of the answer: held bytes of an unfinished character become U+FFFD."""
        return self._utf8.decode(b"", final=True)


class StopMatcher:
    """Stop strings over a stream of text deltas. `feed` returns (text safe to hand out, the stop string
    that matched or None); after a match the answer ends before it. Text that could still be the start
    of a stop string is held back until it cannot. A match cannot begin in text already handed out
    (that text was no stop string's prefix), so each delta is searched together with the held tail
    only: at most max(len(stop)) - 1 characters besides the delta."""

    def __init__(self, stop: Iterable[str] = ()):
        self.stops = tuple(stop)
        self._held = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str | None]:
        if not self.stops:
            return text, None
        buf = self._held + text
        best, hit = -1, None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (best < 0 or i < best):
                best, hit = i, s
        if hit is not None:
            self._held = ""
            return buf[:best], hit
        keep = 0 if final else self._holdback(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], None

    def _holdback(self, buf: str) -> int:
        """Length of buf's longest suffix that is a proper prefix of some stop string."""
        keep, n = 0, len(buf)
        for s in self.stops:
            j = max(n - len(s) + 1, 0)
            # the leftmost start that fits is the longest suffix for s; only longer than keep counts
            while (j := buf.find(s[0], j, n - keep)) >= 0:
                if s.startswith(buf[j:]):
                    keep = n - j
                    break
                j += 1
        return keep


class OutputStream:
    """One answer: new tokens in, text deltas out, until a stop token, a stop string or `finish`.

    `add(tokens)` returns the new text; tokens after the end are ignored. A stop token (stop_token_ids)
    ends the answer without adding text; a stop string ends it before the string (the token that
    completed it is the last one kept). `finish(reason)` ends it otherwise ("length", "cancelled",
    "error", ...) and returns the held-back rest. After the end: `finish_reason`; `stop_reason` (the
    stop string or stop token id that ended it, else None); `n_tokens` (tokens kept, stop token
    included); `text` (the whole answer)."""

    def __init__(self, table: TokenTable, stop: Iterable[str] = (), stop_token_ids: Iterable[int] = ()):
        self._detok = IncrementalDetokenizer(table)
        self._stops = StopMatcher(stop)
        self._stop_ids = frozenset(int(t) for t in stop_token_ids)
        self._parts: list[str] = []
        self.n_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def add(self, tokens: Iterable[int]) -> str:
        out = []
        for t in tokens:
            if self.finish_reason is not None:
                break
            t = int(t)
            self.n_tokens += 1
            if t in self._stop_ids:
                out.append(self._end("stop", t))
                break
            piece = self._detok.feed(t)
            if piece:
                text, hit = self._stops.feed(piece)
                out.append(text)
                if hit is not None:
                    self.finish_reason, self.stop_reason = "stop", hit
        return self._emit("".join(out))

    def finish(self, reason: str) -> str:
        """Ends the answer for `reason` unless it already ended; returns the text still held."""
        return "" if self.finish_reason is not None else self._emit(self._end(reason, None))

    def _end(self, reason: str, stop_reason) -> str:
        text, hit = self._stops.feed(self._detok.flush(), final=True)
        self.finish_reason, self.stop_reason = ("stop", hit) if hit is not None else (reason, stop_reason)
        return text

    def _emit(self, delta: str) -> str:
        if delta:
            self._parts.append(delta)
        return delta


class Detokenized(NamedTuple):
    text: str
    tokens: list[int]  # the tokens kept: through the stop token, or the token that completed a stop string
    finish_reason: str
    stop_reason: str | int | None


def detokenize(table: TokenTable, tokens: Iterable[int], stop: Iterable[str] = (),
               stop_token_ids: Iterable[int] = (), finish_reason: str = "length") -> Detokenized:
    """A finished answer's text with stop strings applied (what `Engine.generate(stop=...)` returns):
    `finish_reason` is the engine's, unless a stop string or stop token came first."""
    toks = [int(t) for t in tokens]
    out = OutputStream(table, stop, stop_token_ids)
    out.add(toks)
    out.finish(finish_reason)
    return Detokenized(out.text, toks[:out.n_tokens], out.finish_reason, out.stop_reason)
