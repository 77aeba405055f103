#!/usr/bin/env python
"""The engine's decode loop alone: ms per step at given row counts and attention windows, in three
forms alternated in one process: the CPU kernel reading the pages in place (`cpu_kernel`, the
engine's default on the CPU), XLA's window copy (the loop gathers its rows' windows once into kept
buffers) and XLA's gather from the pages every step.

    python scripts/bench_decode_step.py [--config 2b] [--layers 4] [--cases 8x2048,8x1024,4x2048,1x2048]
        [--repeats 6] [--steps 8] [--watch SECONDS] [--dtype float32|bfloat16]

Each case ROWSxWINDOW runs `steps.decode` (the engine's decode loop) on ROWS rows whose sequences are WINDOW - 100 tokens
long, their blocks scattered over the pool (random weights of --config widths, --layers decoder
layers; greedy). The first call of each form compiles and is not timed. One JSON line per case:
the median ms per step of each form, and the window copy's over the kernel's.

--watch SECONDS: then the first case's loop (window copy) again for that long, three loops every
two seconds, and one JSON line with each round's ms per step: whether this machine's speed moves
while nothing in the process changes (on the shared 2-core CPU it does: a one-row step between 32
and 66 ms in one process; docs/performance.md)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="2b", choices=["quick", "2b", "4b", "8b"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--cases", default="8x2048,8x1024,4x2048,1x2048")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--steps", type=int, default=8, help="decode steps per loop (the engine's decode_steps)")
    ap.add_argument("--watch", type=float, default=0, help="seconds to re-time the first case afterwards")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights, activations, pools")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import hf_config_dict

    from qvl_jax import Model
    from qvl_jax.config import Qwen3VLConfig
    from qvl_jax.engine import cpu_kernel, paged, sampling, steps

    forms = ["cpu_kernel", "window_copy", "gather_each_step"]
    if not cpu_kernel.available():
        print(f"the CPU kernel cannot run here ({cpu_kernel.unavailable_reason()}): XLA's forms only", file=sys.stderr)
        forms.remove("cpu_kernel")

    model = Model.random(Qwen3VLConfig.from_hf_dict(hf_config_dict(args.config, args.layers)), dtype=jnp.dtype(args.dtype))
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    bs = 16
    eng = model.engine(max_num_seqs=max(r for r, _ in cases), max_model_len=max(w for _, w in cases), block_size=bs,
                       num_blocks=max(r * w for r, w in cases) // bs * 2 + 1)
    rng = np.random.RandomState(0)
    flags = sampling.SamplingFlags()
    def setup(rows, window):
        nb = window // bs
        table = rng.permutation(np.arange(1, eng.num_blocks))[:rows * nb].reshape(rows, nb).astype(np.int32)
        seq = np.full(rows, window - 100, np.int32)
        sp = sampling.SamplingArrays(*(jnp.asarray(a) for a in sampling.SamplingParams().rows(rows)))
        rows_in = steps.Rows(slot=jnp.arange(rows, dtype=jnp.int32), seq_len=jnp.asarray(seq),
                             lo=jnp.zeros(rows, jnp.int32), delta=jnp.zeros(rows, jnp.int32),
                             n_out=jnp.zeros(rows, jnp.int32), max_new=jnp.full(rows, 1 << 20, jnp.int32),
                             limit=jnp.asarray(seq + args.steps), keys=jnp.zeros((rows, 2), jnp.uint32),
                             stop_ids=jnp.full((rows, 1), -1, jnp.int32), sampling=sp)
        return table, rows_in, {"cpu_kernel": (), "window_copy": paged.window_buffers(model.config.text, rows, window,
                                                                                      model.dtype),
                                "gather_each_step": ()}

    def run(rows, window, table, rows_in, bufs, name) -> float:
        """ms per step of one decode loop; keeps the window buffers it hands back."""
        cache = paged.PagedCache(eng._pages, jnp.asarray(table), bufs[name], bs, cpu=name == "cpu_kernel")
        t0 = time.perf_counter()
        cache, eng._seen, eng._counts, out = steps.decode(
            *model.split, flags, window, args.steps, False, cache, eng._seen, eng._counts,
            jnp.zeros(rows, jnp.int32), jnp.ones(rows, bool), rows_in)
        jax.block_until_ready(out)
        eng._pages = cache.pages
        if name == "window_copy":
            bufs[name] = cache.windows
        return (time.perf_counter() - t0) / args.steps * 1000

    for rows, window in cases:
        table, rows_in, bufs = setup(rows, window)
        times = {name: [] for name in forms}
        for i in range(args.repeats + 1):
            for name in times:
                ms = run(rows, window, table, rows_in, bufs, name)
                if i:
                    times[name].append(ms)
        med = {k: round(float(np.median(v)), 1) for k, v in times.items()}
        print(json.dumps({"rows": rows, "window": window, "device": jax.default_backend(), "ms_per_step": med,
                          **({"copy_over_kernel": round(med["window_copy"] / med["cpu_kernel"], 2)} if "cpu_kernel" in med
                             else {})}), flush=True)
    if args.watch > 0:
        rows, window = cases[0]
        table, rows_in, bufs = setup(rows, window)
        run(rows, window, table, rows_in, bufs, "window_copy")  # compiles if the case did not
        rounds, start = [], time.perf_counter()
        while time.perf_counter() - start < args.watch:
            rounds.append(round(float(np.median([run(rows, window, table, rows_in, bufs, "window_copy")
                                                 for _ in range(3)])), 1))
            time.sleep(2)
        print(json.dumps({"watch": f"{rows}x{window}", "seconds": args.watch, "ms_per_step": rounds}), flush=True)
    eng.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
