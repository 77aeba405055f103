#!/usr/bin/env python
"""Batch-1 decode tokens/s with and without prompt-lookup speculative decoding (`model.generate`).

    python scripts/bench_speculative.py [--config 2b] [--layers 4] [--new-tokens 128] [--repeats 3]
                                        [--k 4] [--lookup-max 3] [--lookup-min 1]

Random weights in the real widths of the config (as scripts/bench.py builds them). Random weights
cannot be made to copy their prompt, so the two workloads are chosen by what such a model does:

- copy: greedy decoding after a prompt of a short token pattern repeated. A random model's greedy
  answer falls into a loop of a few tokens, which the proposer then finds in the answer itself
  (and in the prompt where the loop repeats it): the case of an answer that repeats text it has.
- novel: sampling at temperature 1 over the whole vocabulary after a prompt of random tokens: each
  token is close to uniform over 151k ids, so there is next to nothing to copy and speculation
  pays its proposer and its branch for nothing (the case its cost must stay small in).

Each line: workload, tokens/s of decode (prefill excluded; median of repeats after a warm-up call,
plain and speculative calls alternated), with and without speculation, their ratio, the proposals verified and accepted per call, and
whether the two answers were equal (they must be: greedy is exact, and sampling draws the same
tokens for the same seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import hf_config_dict  # noqa: E402


def decode_rates(model, inputs: dict, n: int, repeats: int, spec: dict, **kw):
    """(plain tok/s, speculative tok/s, plain output, speculative output): decode time only (prefill
    excluded), the median of `repeats` calls after a compiling one; plain and speculative calls
    alternate, so that a machine whose load drifts slows both alike."""
    runs = {"plain": {}, "spec": {"speculative_config": spec}}
    for extra in runs.values():
        model.generate(**inputs, max_new_tokens=n, stop_token_ids=[], **kw, **extra)  # compile
    times, outs = {k: [] for k in runs}, {}
    for _ in range(repeats):
        for name, extra in runs.items():
            outs[name] = model.generate(**inputs, max_new_tokens=n, stop_token_ids=[], **kw, **extra)
            times[name].append(outs[name].decode_s)
    rate = {k: (n - 1) / statistics.median(v) for k, v in times.items()}
    return rate["plain"], rate["spec"], outs["plain"], outs["spec"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="2b", choices=["2b", "4b", "8b"])
    ap.add_argument("--layers", type=int, default=4, help="decoder depth (CPU runs)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--lookup-max", type=int, default=3)
    ap.add_argument("--lookup-min", type=int, default=1)
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="default: bfloat16 on GPU, float32 on CPU")
    args = ap.parse_args(argv)

    import qvl_jax
    from qvl_jax.config import Qwen3VLConfig

    on_cpu = jax.devices()[0].platform == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    cfg = Qwen3VLConfig.from_hf_dict(hf_config_dict(args.config, args.layers))
    model = qvl_jax.Model.random(cfg, dtype=dtype)
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": args.lookup_max,
            "prompt_lookup_min": args.lookup_min}
    rng = np.random.RandomState(0)
    vocab = 150000  # below the special ids
    pattern = rng.randint(0, vocab, size=4)
    workloads = {
        "copy": ({"input_ids": np.tile(pattern, args.prompt_len // 4)[None]}, {}),
        "novel": ({"input_ids": rng.randint(0, vocab, size=(1, args.prompt_len))}, {"temperature": 1.0, "seed": 0}),
    }
    for name, (inputs, kw) in workloads.items():
        t0 = time.perf_counter()
        plain, fast, ref, out = decode_rates(model, inputs, args.new_tokens, args.repeats, spec, **kw)
        print(json.dumps({
            "workload": name, "device": jax.devices()[0].device_kind, "dtype": dtype, "config": args.config,
            "layers": cfg.text.num_hidden_layers, "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "new_tokens": args.new_tokens, "speculative_config": spec,
            "plain_tok_s": round(plain, 2), "spec_tok_s": round(fast, 2), "speedup": round(fast / plain, 3),
            "proposed": int(out.proposed_tokens[0]), "accepted": int(out.accepted_tokens[0]),
            "equal": bool(np.array_equal(out.tokens, ref.tokens)), "seconds": round(time.perf_counter() - t0, 1)}),
            flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
