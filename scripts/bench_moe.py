"""One sparse MoE block (router + experts) at the widths of Qwen3-VL-30B-A3B, each expert computation
of qvl_jax.modeling.moe timed over a range of token counts:

    python scripts/bench_moe.py [--tokens 1,8,64,512] [--dtype float32] [--repeats 5]

"scan" (a loop over the tokens sorted by expert, each step one expert's weights read in place; "scan@R"
forces R tokens per step), "ragged" (tokens sorted by expert, grouped matmuls), "gather" (each token's experts' weights gathered),
"dense" (every expert on every token, the naive reference) and "auto" (what the model runs). Prints one
JSON line per (tokens, impl): median milliseconds per call, and the largest difference from "dense".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,8,64,512")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--expert-mlp", type=int, default=768)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--impls", default="dense,scan,ragged,gather,auto")
    args = ap.parse_args(argv)

    from qvl_jax.config import TextConfig
    from qvl_jax.modeling import moe

    dtype = jnp.dtype(args.dtype)
    cfg = TextConfig(vocab_size=1, hidden_size=args.hidden, intermediate_size=1, num_hidden_layers=1,
                     num_attention_heads=1, num_key_value_heads=1, head_dim=2, mrope_section=(1, 0, 0),
                     num_experts=args.experts, num_experts_per_tok=args.top_k,
                     moe_intermediate_size=args.expert_mlp)
    from flax import nnx

    block = moe.SparseMoeBlock(cfg, rngs=nnx.Rngs(0), dtype=dtype)
    router, gate_up, down = (jnp.asarray(block.gate.weight[...]), jnp.asarray(block.experts.gate_up_proj[...]),
                             jnp.asarray(block.experts.down_proj[...]))

    def run(name):
        impl, _, rows = name.partition("@")

        @jax.jit
        def f(x, router, gate_up, down):
            logits = moe.matmul_t(x, router)
            probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
            top, idx = jax.lax.top_k(probs, args.top_k)
            w = (top / top.sum(-1, keepdims=True)).astype(x.dtype)
            return moe.expert_mlp(x, w, idx.astype(jnp.int32), gate_up, down, impl, int(rows) if rows else None)
        return f

    def resolved(name, n):
        impl = moe.choose_impl(name.partition("@")[0], n, args.top_k, args.experts)
        if impl == "scan":
            impl += "@" + (name.partition("@")[2] or str(moe.scan_rows(n, args.top_k, args.experts)))
        return impl

    rng = np.random.RandomState(0)
    for n in (int(t) for t in args.tokens.split(",")):
        x = jnp.asarray(rng.randn(n, args.hidden).astype(np.float32)).astype(dtype)
        ref = None
        for impl in args.impls.split(","):
            f = run(impl)
            out = f(x, router, gate_up, down).block_until_ready()
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                f(x, router, gate_up, down).block_until_ready()
                times.append(time.perf_counter() - t)
            if impl == "dense":
                ref = out
            diff = None if ref is None else float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max())
            print(json.dumps({"tokens": n, "impl": impl, "resolved": resolved(impl, n),
                              "ms": round(statistics.median(times) * 1e3, 3), "max_abs_diff_vs_dense": diff,
                              "dtype": args.dtype, "device": jax.devices()[0].platform}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
