"""Constrained decoding in the engine: output tok/s and decode calls (host round trips) of sampled
requests, every one constrained by a JSON schema, against the same requests unconstrained
(ignore_eos, so both run to max_new_tokens), offline through `engine.generate`.

    PYTHONPATH=$PWD python scripts/bench_structured.py [--model tiny-random] [--requests 8] [--max-new 64]
"""

from __future__ import annotations

import argparse
import json
import time

SCHEMA = {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"}}},
          "required": ["notes"]}


def main(argv=None) -> None:
    import qvl_jax

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=8)
    args = ap.parse_args(argv)
    m = qvl_jax.load(args.model)
    proc = qvl_jax.Processor.from_pretrained(m.path)
    inputs = [{"input_ids": proc.apply_chat_template([{"role": "user", "content": f"question {i}"}],
                                                     add_generation_prompt=True, tokenize=True, return_dict=True,
                                                     return_tensors="np")["input_ids"]} for i in range(args.requests)]
    for name, kw in (("none", {"ignore_eos": True}), ("json_schema", {"structured": {"json": SCHEMA}})):
        with m.engine(max_num_seqs=args.requests, max_model_len=256 + args.max_new,
                      decode_steps=args.decode_steps) as eng:
            eng.generate(inputs, max_new_tokens=8, temperature=1.0, seed=0, **kw)  # compiles
            eng.stats.clear()
            t0 = time.perf_counter()
            outs = eng.generate(inputs, max_new_tokens=args.max_new, temperature=1.0, seed=1, **kw)
            wall = time.perf_counter() - t0
            tokens = sum(len(o.tokens) for o in outs)
            s = eng.stats
            print(json.dumps({"constraint": name, "output_tokens": tokens, "output_tok_s": round(tokens / wall, 1),
                              "decode_calls": s["decode_chunks"], "decode_tokens": s["decode_tokens"],
                              "decode_calls_per_token": round(s["decode_chunks"] * len(outs) / max(1, s["decode_tokens"]),
                                                              3)}), flush=True)


if __name__ == "__main__":
    main()
