#!/usr/bin/env python
"""The matrix products of a decode step on this device: `qvl_jax.modeling.layers.matmul_t` (which
puts the [out, in] weight on the left of the dot on the CPU from 2 to WEIGHT_LEFT_MAX_ROWS rows)
against the plain dot x @ w.T, at each row count.

    python scripts/bench_matmul.py [--rows 1,2,4,8,16,32,64,128,256,512] [--layers 4] [--repeats 3]
        [--dtype float32|bfloat16]

--dtype bfloat16: weights and activations in bfloat16 (products accumulate as XLA chooses); XLA's CPU
library choices for dots come from XLA_FLAGS (e.g. --xla_cpu_experimental_ynn_fusion_type=dot), so
run the script once per setting to compare them.

A chain of --layers decoder layers at Qwen3-VL-2B widths (q/k/v/o, gate/up/down; random float32
weights, distinct per layer, so the weights stream from memory as in the model) and the tied
lm_head [151936, 2048], in a `lax.while_loop` of steps like the decode loop (8 steps up to 16 rows,
2 above; above 64 rows the lm_head takes one row, as a prefill chunk's last position does). Each
form is compiled first, then the forms are timed alternately; one line per row count with the
median ms per step of each form and their ratio."""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from qvl_jax.modeling.layers import matmul_t

SHAPES = [(2048, 2048), (1024, 2048), (1024, 2048), (2048, 2048), (6144, 2048), (6144, 2048), (2048, 6144)]


def plain(x, w):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))


def chain(mm, steps: int):
    def step(x, ws, emb):
        h = x
        for i in range(0, len(ws), 7):
            q, k, v, o, g, u, d = ws[i:i + 7]
            a, b, c = mm(h, q), mm(h, k), mm(h, v)
            h = h + mm(a, o) + 0 * (b.sum() + c.sum())
            h = h + mm(jax.nn.silu(mm(h, g)) * mm(h, u), d)
            h = h / (1 + jnp.abs(h).mean())
        return mm(h if h.shape[0] <= 64 else h[-1:], emb)

    def loop(x, ws, emb):
        def body(c):
            i, x, acc = c
            logits = step(x, ws, emb)
            return i + 1, x + logits[:1, :x.shape[1]] * 1e-6, acc + logits[0, 0]
        return jax.lax.while_loop(lambda c: c[0] < steps, body, (0, x, jnp.zeros(())))[2]

    return jax.jit(loop)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128,256,512")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dt = jnp.dtype(args.dtype)
    key = jax.random.PRNGKey(0)
    ws = [(jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32) * 0.02).astype(dt)
          for i, s in enumerate(SHAPES * args.layers)]
    emb = (jax.random.normal(key, (151936, 2048), jnp.float32) * 0.02).astype(dt)
    for rows in (int(r) for r in args.rows.split(",")):
        steps = 8 if rows <= 16 else 2
        x = jax.random.normal(key, (rows, 2048), jnp.float32).astype(dt)
        forms = {"plain": chain(plain, steps), "matmul_t": chain(matmul_t, steps)}
        times = {name: [] for name in forms}
        for f in forms.values():
            f(x, ws, emb).block_until_ready()
        for _ in range(args.repeats):
            for name, f in forms.items():
                t0 = time.perf_counter()
                f(x, ws, emb).block_until_ready()
                times[name].append((time.perf_counter() - t0) / steps * 1000)
        med = {name: round(float(np.median(t)), 1) for name, t in times.items()}
        print(json.dumps({"rows": rows, "device": jax.default_backend(), "dtype": args.dtype, "ms_per_step": med,
                          "plain_over_matmul_t": round(med["plain"] / med["matmul_t"], 2)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
