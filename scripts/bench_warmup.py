"""Warm-up cost per sampler: the engine programs `serve --warm-up full` compiles, and their seconds.

Builds an engine as `qvl-jax serve` does (its default max_num_seqs 16 and context), then warms it up
for the two plain samplers the server compiles (greedy, temperature 1), then for the constrained one
(structured outputs: the allowed-token mask, one-step decode loops), and prints one JSON line each:
programs and seconds. Run with QVL_JAX_COMPILATION_CACHE=0 to time compiling, not cache loads.

    QVL_JAX_COMPILATION_CACHE=0 PYTHONPATH=$PWD python scripts/bench_warmup.py [--model M] [--max-num-seqs N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    args = ap.parse_args()
    import qvl_jax
    from qvl_jax.hub import resolve_model
    from qvl_jax.processing.processor import Processor

    path = resolve_model(args.model)
    model, proc = qvl_jax.load(path), Processor.from_pretrained(path)
    eng = model.engine(max_num_seqs=args.max_num_seqs, processor=proc)
    eos = sorted(proc.eos_token_ids)
    samplers = {"plain": ({"temperature": 0.0}, {"temperature": 1.0}),
                "constrained": ({"temperature": 1.0, "structured": {"json_object": True}, "stop_token_ids": eos},)}
    try:
        for name, sampling in samplers.items():
            seen = []

            def progress(i, n, prog):
                seen.append(n)
                if i % 10 == 0:
                    print(f"{name}: program {i + 1} of {n} ({prog[0]}) at {time.strftime('%X')}", file=sys.stderr,
                          flush=True)

            secs = eng.warm_up(sampling=sampling, progress=progress)
            print(json.dumps({"samplers": name, "programs": seen[0] if seen else 0, "seconds": round(secs, 1)}),
                  flush=True)
    finally:
        eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
