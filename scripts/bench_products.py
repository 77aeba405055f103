#!/usr/bin/env python
"""A prefill step's matrix products, ours against torch's: each linear layer shape of a Qwen3-VL-2B
decoder layer (q/o, k/v, gate/up, down) at --rows rows, through `qvl_jax.modeling.layers.matmul_t`
(XLA's product on this device), through `torch.nn.functional.linear` (on the CPU oneDNN's, the
library vLLM's CPU backend runs its linear layers with) and, at bfloat16 where the engine's CPU
kernels build, through `cpu_kernel.gemm_packed` over a weight packed once (`pack_weight`; "packed"),
timed alternately in one process.

    python scripts/bench_products.py [--rows 520] [--dtype bfloat16|float32] [--repeats 15]

Prints one JSON line per shape: the median ms of each, its TFLOP/s, and ours (and packed) over
torch's; then the sum over one decoder layer's seven products. Needs torch (the `test` extra). The products are
most of a prompt chunk's step on the CPU (docs/performance.md), so this ratio bounds how far our
prefill can get ahead of a server whose products run through oneDNN."""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from qvl_jax.modeling.layers import matmul_t

# (name, in, out, how many a decoder layer has)
SHAPES = [("q/o", 2048, 2048, 2), ("k/v", 2048, 1024, 2), ("gate/up", 2048, 6144, 2), ("down", 6144, 2048, 1)]


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=520)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    import torch  # only for the comparison: the `test` extra

    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    rng = np.random.default_rng(0)
    from qvl_jax.engine import cpu_kernel

    ours = jax.jit(matmul_t)
    packed = args.dtype == "bfloat16" and cpu_kernel.available()
    gemm = jax.jit(cpu_kernel.gemm_packed)
    layer = {"ours": 0.0, "torch": 0.0, **({"packed": 0.0} if packed else {})}
    for name, fan_in, fan_out, count in SHAPES:
        x32 = rng.standard_normal((args.rows, fan_in)).astype(np.float32)
        w32 = (rng.standard_normal((fan_out, fan_in)) * 0.02).astype(np.float32)
        x, w = jnp.asarray(x32, args.dtype), jnp.asarray(w32, args.dtype)
        tx, tw = torch.from_numpy(x32).to(tdt), torch.from_numpy(w32).to(tdt)
        forms = {"ours": lambda: ours(x, w).block_until_ready(),
                 "torch": lambda: torch.nn.functional.linear(tx, tw)}
        if packed:
            wp = jax.block_until_ready(cpu_kernel.pack_weight(w))
            forms["packed"] = lambda: gemm(x, wp).block_until_ready()
        for f in forms.values():
            f()
        times = {k: [] for k in forms}
        for _ in range(3):  # alternated rounds
            for k, f in forms.items():
                times[k].append(_median_ms(f, args.repeats))
        med = {k: round(float(np.median(v)), 2) for k, v in times.items()}
        flops = 2 * args.rows * fan_in * fan_out
        for k in layer:
            layer[k] += med[k] * count
        print(json.dumps({"shape": f"{name} [{args.rows}, {fan_in}] x [{fan_in}, {fan_out}]", "dtype": args.dtype,
                          "ms": med, "tflop_s": {k: round(flops / v / 1e9, 2) for k, v in med.items()},
                          **{f"{k}_over_torch": round(med[k] / med["torch"], 2) for k in med if k != "torch"}}),
              flush=True)
    print(json.dumps({"one_layer_ms": {k: round(v, 1) for k, v in layer.items()},
                      **{f"{k}_over_torch": round(v / layer["torch"], 2) for k, v in layer.items() if k != "torch"},
                      "device": jax.default_backend(),
                      "torch": torch.__version__, "torch_threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
