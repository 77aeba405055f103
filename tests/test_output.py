"""Output processing (qvl_jax.engine.output): the incremental detokenizer's text equals the
tokenizer's whole decode on random token sequences (characters split across byte tokens, invalid
bytes, special and non-special added tokens, ids past the vocab) without re-decoding; stop strings
against a brute-force reference, with the minimal holdback, spanning tokens, in bounded work; stop
tokens, finish reasons and the validation bounds."""

from __future__ import annotations

import random

import pytest

from qvl_jax.engine.output import (MAX_STOP_CHARS, MAX_STOP_STRINGS, OutputStream, StopMatcher, TokenTable,
                                   check_stop, detokenize)
from qvl_jax.errors import InputError


@pytest.fixture(scope="module")
def proc():
    from qvl_jax.processing.processor import Processor

    return Processor.from_pretrained("tiny-random")


def _random_tokens(proc, rng: random.Random, n: int) -> list[int]:
    """A mix: pieces of encoded multi-byte text, single byte tokens (lone lead and continuation bytes
    among them), added tokens (special and not), any vocab id, and ids past the tokenizer's vocab."""
    size = proc.tokenizer.get_vocab_size()
    added = sorted(proc.tokenizer.get_added_tokens_decoder())
    single = [i for i in range(size) if len(proc.token_bytes(i)) == 1]
    words = ["é", "日本語", "🙂👍", "naïve ", "中文 text", "Ünïcödé", " the", "\n\n", "<think>"]
    out: list[int] = []
    while len(out) < n:
        kind = rng.random()
        if kind < 0.35:
            out += proc.encode(rng.choice(words), add_special_tokens=False)
        elif kind < 0.55:
            out.append(rng.choice(single))
        elif kind < 0.7:
            out.append(rng.choice(added))
        elif kind < 0.95:
            out.append(rng.randrange(size))
        else:
            out.append(size + rng.randrange(8))
    return out[:n]


def test_incremental_text_equals_decode(proc):
    """Every prefix: the text handed out is the decode's, less at most one held (unfinished)
    character; at the end, exactly the decode of all tokens."""
    table = TokenTable.of(proc)
    rng = random.Random(0)
    for trial in range(150):
        toks = _random_tokens(proc, rng, rng.randrange(1, 40))
        out = OutputStream(table)
        shown = ""
        for j, t in enumerate(toks):
            shown += out.add([t])
            full = proc.decode(toks[:j + 1], skip_special_tokens=True)
            assert full.startswith(shown) and len(full) - len(shown) <= 1, (toks[:j + 1], shown, full)
        shown += out.finish("length")
        assert shown == out.text == proc.decode(toks, skip_special_tokens=True), toks
        assert out.finish_reason == "length" and out.stop_reason is None and out.n_tokens == len(toks)


def test_split_character_is_held_then_whole(proc):
    """A character whose bytes come in separate tokens appears once it is complete, never as U+FFFD."""
    table = TokenTable.of(proc)
    byte_token = {proc.token_bytes(i): i for i in range(proc.tokenizer.get_vocab_size())
                  if len(proc.token_bytes(i)) == 1}
    emoji = "🙂".encode()
    out = OutputStream(table, stop_token_ids=proc.eos_token_ids)
    deltas = [out.add([byte_token[emoji[k:k + 1]]]) for k in range(4)]
    assert deltas == ["", "", "", "🙂"]
    # a special token between the bytes of a character vanishes, as in the decode
    out = OutputStream(table)
    im_start = proc.tokenizer.token_to_id("<|im_start|>")
    assert out.add([byte_token[emoji[:1]], im_start, byte_token[emoji[1:2]]]) == ""
    assert out.add([byte_token[emoji[2:3]], byte_token[emoji[3:]]]) == "🙂"
    # an unfinished character at the end becomes one U+FFFD, as the lossy decode makes it
    out = OutputStream(table)
    assert out.add([byte_token[emoji[:1]], byte_token[emoji[1:2]]]) == "" and out.finish("length") == "\ufffd"


def test_no_whole_answer_decode(proc):
    """The detokenizer asks the processor about each distinct id once, one id at a time."""
    calls = []

    class Spy:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return proc.decode(ids, skip_special_tokens=skip_special_tokens)

        def token_bytes(self, t):
            return proc.token_bytes(t)

    toks = _random_tokens(proc, random.Random(1), 3000)
    out = OutputStream(TokenTable.of(Spy()))
    text = "".join(out.add([t]) for t in toks) + out.finish("length")
    assert text == proc.decode(toks, skip_special_tokens=True)
    assert set(calls) == {1} and len(calls) == len(set(toks))


def _reference(deltas: list[str], stops: list[str]):
    """OpenAI/vLLM stop semantics by brute force over the whole text after each delta: the answer ends
    before the earliest stop string (the first listed on a tie), checked as each delta arrives."""
    text = ""
    for d in deltas:
        text += d
        hits = [(text.find(s), k) for k, s in enumerate(stops) if s in text]
        if hits:
            i, k = min(hits)
            return text[:i], stops[k]
    return text, None


def _held(text: str, stops: list[str]) -> int:
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def test_stop_strings_against_brute_force():
    """Random texts over a small alphabet, split into random deltas, against random stop strings
    (overlapping, repeated letters): same cut, same matched string; what is handed out before a
    match is always the text less exactly its longest suffix that starts a stop string."""
    rng = random.Random(2)
    for trial in range(3000):
        text = "".join(rng.choice("aab c\n") for _ in range(rng.randrange(0, 30)))
        cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(0, len(text) // 2 + 1))) if len(text) > 1 else []
        deltas = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        stops = ["".join(rng.choice("aab c\n") for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(1, 4))]
        m, shown, seen, hit = StopMatcher(stops), "", "", None
        for d in deltas:
            seen += d
            got, hit = m.feed(d)
            shown += got
            if hit is not None:
                break
            assert shown == seen[:len(seen) - _held(seen, stops)], (seen, stops, shown)
        if hit is None:
            shown += m.feed("", final=True)[0]
        assert (shown, hit) == _reference(deltas, stops), (deltas, stops)


def test_stop_matcher_work_is_bounded():
    """A long answer with a long stop string that keeps almost matching: the text kept between
    deltas never exceeds the longest stop string less one character."""
    stop = "ab" * 20 + "X"
    m = StopMatcher([stop, "zz"])
    shown = ""
    for k in range(20000):
        shown += m.feed("ab"[k % 2])[0]
        assert len(m._held) < len(stop)
    assert len(shown) == 20000 - len(m._held) and m.feed("X")[1] == stop


def test_output_stream_stops(proc):
    """Stop token: ends without its text, counted in the tokens kept; stop string spanning tokens:
    the text ends before it and the token completing it is the last kept; later tokens are ignored."""
    table = TokenTable.of(proc)
    ids = proc.encode("hello world, this is the end. more text", add_special_tokens=False)
    eos = proc.eos_token_ids[0]
    want = proc.decode(ids)
    stop = "is the e"
    r = detokenize(table, ids + [eos], stop=[stop], stop_token_ids=[eos])
    assert r.text == want[:want.find(stop)] and r.finish_reason == "stop" and r.stop_reason == stop
    assert proc.decode(r.tokens).find(stop) >= 0 and stop not in proc.decode(r.tokens[:-1])
    r = detokenize(table, ids + [eos] + ids, stop_token_ids=[eos])
    assert (r.text, r.tokens, r.finish_reason, r.stop_reason) == (want, ids + [eos], "stop", eos)
    r = detokenize(table, ids, stop=["nowhere"], stop_token_ids=[eos], finish_reason="length")
    assert (r.text, r.tokens, r.finish_reason) == (want, ids, "length")
    # a stop string that is completed only by the flush at a stop token
    out = OutputStream(table, stop=["end. more"], stop_token_ids=[eos])
    text = out.add(ids) + out.add([eos]) + out.finish("length")
    assert text == want[:want.find("end. more")] and out.finish_reason == "stop"
    # streamed in random chunks: the same text and tokens as all at once
    rng = random.Random(3)
    for trial in range(50):
        toks = _random_tokens(proc, rng, 30)
        stops = [proc.decode(toks[a:a + 2])[:3] or "x" for a in (rng.randrange(30), rng.randrange(30))]
        whole = detokenize(table, toks, stop=stops, stop_token_ids=[eos])
        out, text, k = OutputStream(table, stops, [eos]), "", 0
        while k < len(toks):
            n = rng.randrange(1, 6)
            text += out.add(toks[k:k + n])
            k += n
        text += out.finish("length")
        assert (text, out.n_tokens, out.finish_reason, out.stop_reason) == \
            (whole.text, len(whole.tokens), whole.finish_reason, whole.stop_reason)
        # the kept tokens decode to the text, up to the stop string
        kept = whole.tokens[:-1] if whole.stop_reason == eos else whole.tokens
        assert proc.decode(kept).startswith(whole.text)


def test_check_stop():
    assert check_stop(None) == () and check_stop("\n") == ("\n",) and check_stop(["a", "b"]) == ("a", "b")
    for bad, words in ((["x"] * (MAX_STOP_STRINGS + 1), f"at most {MAX_STOP_STRINGS}"), ([""], "non-empty"),
                       (["y" * (MAX_STOP_CHARS + 1)], f"at most {MAX_STOP_CHARS} characters"), ([3], "strings")):
        with pytest.raises(InputError, match=words) as e:
            check_stop(bad)
        assert "\n" not in str(e.value)
