"""Host overhead per call of the jitted paths, on the built-in tiny model (where the device work is
negligible, so the time is dispatch: flattening the params, the jit cache lookup, the host loop).

    python scripts/bench_step_overhead.py [--steps 64] [--repeats 7]

Prints one JSON line: median ms per streamed decode step (one jitted call per token), per
`logits` call, and per `generate` call of 8 tokens. Uses only the public API, so the same script
measures an older checkout (PYTHONPATH=that checkout) back to back with this one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import qvl_jax
    from qvl_jax.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as d:
        model = qvl_jax.load(write_tiny_checkpoint(f"{d}/tiny"))
    ids = np.arange(10, 42, dtype=np.int32)[None]

    def per_step() -> float:
        t = time.perf_counter()
        n = sum(1 for _ in model.stream(input_ids=ids, max_new_tokens=args.steps, stop_token_ids=[]))
        return (time.perf_counter() - t) / n * 1e3

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    per_step()  # compile
    model.logits(ids)
    model.generate(input_ids=ids, max_new_tokens=8, stop_token_ids=[])
    out = {
        "stream_step_ms": statistics.median(per_step() for _ in range(args.repeats)),
        "logits_ms": statistics.median(timed(lambda: model.logits(ids)) for _ in range(args.repeats * 4)),
        "generate8_ms": statistics.median(
            timed(lambda: model.generate(input_ids=ids, max_new_tokens=8, stop_token_ids=[]))
            for _ in range(args.repeats * 4)),
    }
    print(json.dumps({k: round(v, 3) for k, v in out.items()}))


if __name__ == "__main__":
    main()
