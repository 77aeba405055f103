"""Token-mask fill time of the grammar libraries (llguidance, xgrammar) for a Qwen-sized vocabulary.

Builds the byte-level tokenizer grown to 151,936 entries that bench_serve.py's random checkpoints
carry (Qwen's added tokens at Qwen's ids), compiles a JSON schema (nested objects, arrays, enums,
required fields), then walks each library's matcher along the tokens of a valid answer, timing the
mask of every position (the work a constrained row costs the host per token).

    PYTHONPATH=$PWD python scripts/bench_mask.py [--vocab 151936] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city"]},
        "kind": {"enum": ["cat", "dog", "bird"]},
    },
    "required": ["name", "age", "tags", "address", "kind"],
    "additionalProperties": False,
}
ANSWER = {"name": "Alice in the wonderland of tokens", "age": 42, "tags": ["a", "bb", "ccc", "the quick brown fox"],
          "address": {"city": "Zurich", "zip": "8000"}, "kind": "dog"}


def _stats(times: list[float]) -> str:
    t = np.asarray(times) * 1e3
    return f"mean {t.mean():.3f} ms, p50 {np.median(t):.3f}, p99 {np.percentile(t, 99):.3f}, max {t.max():.3f}"


def bench_llguidance(tok_json: str, vocab: int, eos: list[int], ids: list[int], repeat: int):
    import llguidance
    import llguidance.numpy

    t0 = time.perf_counter()
    lt = llguidance.LLTokenizer(tok_json, n_vocab=vocab, eos_token=eos)
    t_tok = time.perf_counter() - t0
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    fills, compiles = [], []
    mask = llguidance.numpy.allocate_token_bitmask(1, vocab)
    for _ in range(repeat):
        t0 = time.perf_counter()
        m = llguidance.LLMatcher(lt, grammar)
        compiles.append(time.perf_counter() - t0)
        assert not m.is_error(), m.get_error()
        for t in ids:
            t0 = time.perf_counter()
            llguidance.numpy.fill_next_token_bitmask(m, mask)
            fills.append(time.perf_counter() - t0)
            assert (mask[0, t // 32] >> (t % 32)) & 1, f"token {t} refused"
            assert m.consume_token(t), m.get_error()
        assert m.is_accepting()
    return t_tok, statistics.median(compiles), fills


def bench_ours(tok_json: str, vocab: int, eos: list[int], ids: list[int], repeat: int):
    """What a constrained row costs the engine per token: structured.masks (allocation, llguidance's
    fill, the added-token check) and Matcher.consume."""
    from qvl_jax.engine import structured

    c = structured.Compiler(tok_json, vocab, tuple(eos))
    grammar = c.compile(structured.StructuredOutputs(json=SCHEMA))
    fills = []
    for _ in range(repeat):
        m = c.matcher(grammar)
        for t in ids:
            t0 = time.perf_counter()
            mask = structured.masks([m], 1, vocab)
            m.consume([t])
            fills.append(time.perf_counter() - t0)
            assert (int(mask[0, t // 32]) >> (t % 32)) & 1, f"token {t} refused"
    return fills


def bench_xgrammar(hf_tok, vocab: int, eos: list[int], ids: list[int], repeat: int):
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab, stop_token_ids=eos)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t_tok = time.perf_counter() - t0
    fills, compiles = [], []
    mask = xgr.allocate_token_bitmask(1, vocab)
    for _ in range(repeat):
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                separators=(",", ":"))
        m = xgr.GrammarMatcher(compiled)
        compiles.append(time.perf_counter() - t0)
        for t in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask)
            fills.append(time.perf_counter() - t0)
            assert (int(mask[0, t // 32]) >> (t % 32)) & 1, f"token {t} refused"
            assert m.accept_token(t)
    return t_tok, statistics.median(compiles), fills


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=["llguidance", "xgrammar"])
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_serve import _full_vocab_tokenizer

    tok, added = _full_vocab_tokenizer(args.vocab)
    eos = [added["<|im_end|>"], added["<|endoftext|>"]]
    text = json.dumps(ANSWER, separators=(",", ":"))
    ids = tok.encode(text).ids
    spaced = tok.encode(json.dumps(ANSWER)).ids  # as our compiler's JSON options write it: ", " and ": "
    print(f"vocab {args.vocab} ({tok.get_vocab_size()} tokenizer entries); answer of {len(ids)} tokens")
    if args.only != "xgrammar":
        t_tok, t_comp, fills = bench_llguidance(tok.to_str(), args.vocab, eos, ids, args.repeat)
        print(f"llguidance: tokenizer {t_tok:.2f} s, schema compile {t_comp * 1e3:.1f} ms, mask {_stats(fills)}")
        print(f"qvl_jax structured.masks + consume per token: {_stats(bench_ours(tok.to_str(), args.vocab, eos, spaced, args.repeat))}")
    if args.only != "llguidance":
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=tok)
        t_tok, t_comp, fills = bench_xgrammar(hf, args.vocab, eos, ids, args.repeat)
        print(f"xgrammar:   tokenizer {t_tok:.2f} s, schema compile {t_comp * 1e3:.1f} ms, mask {_stats(fills)}")


if __name__ == "__main__":
    main()
