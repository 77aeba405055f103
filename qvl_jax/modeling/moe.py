"""The Mixture-of-Experts MLP of Qwen3-VL-MoE (transformers' qwen3_vl_moe) as Flax NNX modules, with
transformers' paths: `layers[i].mlp.gate.weight` (the router, [experts, d]) and the fused expert
tensors `layers[i].mlp.experts.gate_up_proj` [experts, 2 * f, d] (gate rows first, then up) and
`.down_proj` [experts, d, f], in the [out, in] layout transformers 5 holds them in (the converter
turns the older [in, out] layout into this one).

The router: logits in the input dtype, softmax over the experts in float32, the top-k
probabilities renormalised to sum to one, cast back to the input dtype. Each chosen expert is a
SwiGLU MLP; a token's output is the weighted sum of its experts' outputs.

Four ways to compute the experts, none with a Python loop over experts (`MOE_IMPLS`):
- "scan": the (token, expert) pairs sorted by expert, and a `lax.fori_loop` whose step slices one
  expert's weights and applies them to its next `scan_rows` tokens, added back per token. Reads
  each chosen expert about once and in place (with one token per step XLA CPU fuses the slice into
  the matrix-vector product); does e / k times less work than "dense" for many tokens. The CPU path.
- "ragged": the (token, expert) pairs sorted by expert, two grouped matmuls
  (`jax.lax.ragged_dot_general`, the weights in their stored layout), the results added back per
  token. Work proportional to tokens * k where a grouped-matmul kernel exists.
- "gather": each token's k experts' weights gathered and applied with einsums. Materializes a copy
  of every chosen expert's weights (written, then read again).
- "dense": every expert on every token, weighted by a [tokens, experts] matrix that is zero off
  the chosen ones. The naive reference.
"auto" takes "scan" on the CPU at every token count (measured against the others by
scripts/bench_moe.py, docs/performance.md: 25-50x "gather" at 1 and 8 tokens, 5-13x "dense" at 64;
XLA's CPU backend runs a ragged dot about as slowly as one dense dot per group). On other backends
it keeps "gather" when tokens * k <= experts and "ragged" above, not yet measured there.

Einsum letters: n tokens, d model width, e experts, k experts per token, f expert MLP width,
m (token, expert) pairs sorted by expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qvl_jax.config import TextConfig
from qvl_jax.modeling.layers import matmul_t, param, silu


class TopKRouter(nnx.Module):
    """`mlp.gate`: weight [experts, d]."""

    def __init__(self, cfg: TextConfig, *, rngs, dtype=jnp.float32):
        self.weight = param(rngs, (cfg.num_experts, cfg.hidden_size), ("router", "embed"), dtype)
        self.top_k = cfg.num_experts_per_tok

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [n, d] -> (logits [n, e] in x's dtype, weights [n, k] in x's dtype, experts [n, k] int32)."""
        logits = matmul_t(x, self.weight[...])
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        top, idx = jax.lax.top_k(probs, self.top_k)
        top = top / jnp.sum(top, axis=-1, keepdims=True)
        return logits, top.astype(logits.dtype), idx.astype(jnp.int32)


class Experts(nnx.Module):
    """`mlp.experts`: gate_up_proj [e, 2f, d] and down_proj [e, d, f]."""

    def __init__(self, cfg: TextConfig, *, rngs, dtype=jnp.float32):
        E, D, F = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = param(rngs, (E, 2 * F, D), ("experts", "expert_mlp", "embed"), dtype)
        self.down_proj = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), dtype)


class SparseMoeBlock(nnx.Module):
    """`layers[i].mlp` of a sparse layer: the router `gate` and the `experts`."""

    def __init__(self, cfg: TextConfig, *, rngs, dtype=jnp.float32):
        self.gate = TopKRouter(cfg, rngs=rngs, dtype=dtype)
        self.experts = Experts(cfg, rngs=rngs, dtype=dtype)
        self.impl = cfg.moe_impl

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward(x)[0]

    def forward(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [..., d] -> (y [..., d], router logits [n, e])."""
        flat = x.reshape(-1, x.shape[-1])
        logits, weights, idx = self.gate(flat)
        y = expert_mlp(flat, weights, idx, self.experts.gate_up_proj[...], self.experts.down_proj[...],
                       self.impl)
        return y.reshape(x.shape), logits


def choose_impl(impl: str, tokens: int, k: int, experts: int) -> str:
    if impl != "auto":
        return impl
    if jax.default_backend() == "cpu":
        return "scan"
    return "gather" if tokens * k <= experts else "ragged"


def expert_mlp(x: jax.Array, weights: jax.Array, idx: jax.Array, gate_up: jax.Array, down: jax.Array,
               impl: str = "auto", rows: int | None = None) -> jax.Array:
    """sum_j weights[n, j] * SwiGLU_{idx[n, j]}(x[n]): x [n, d], weights/idx [n, k] -> [n, d].
    `rows`: "scan"'s tokens per step (default `scan_rows`)."""
    n, k = idx.shape
    impl = choose_impl(impl, n, k, gate_up.shape[0])
    if impl == "scan":
        return _scan(x, weights, idx, gate_up, down, rows or scan_rows(n, k, gate_up.shape[0]))
    if impl == "gather":
        return _gather(x, weights, idx, gate_up, down)
    if impl == "dense":
        return _dense(x, weights, idx, gate_up, down)
    if impl == "ragged":
        return _ragged(x, weights, idx, gate_up, down)
    raise ValueError(f"unknown MoE implementation {impl!r}")


def _swiglu(h: jax.Array) -> jax.Array:
    f = h.shape[-1] // 2
    return silu(h[..., :f]) * h[..., f:]


def _gather(x, weights, idx, gate_up, down):
    h = jnp.einsum("nd,nkfd->nkf", x, jnp.take(gate_up, idx, axis=0))
    y = jnp.einsum("nkf,nkdf->nkd", _swiglu(h), jnp.take(down, idx, axis=0))
    return jnp.einsum("nkd,nk->nd", y, weights)


def _dense(x, weights, idx, gate_up, down):
    n, e = x.shape[0], gate_up.shape[0]
    combine = jnp.zeros((n, e), weights.dtype).at[jnp.arange(n)[:, None], idx].add(weights)
    h = jnp.einsum("nd,efd->nef", x, gate_up)
    y = jnp.einsum("nef,edf->ned", _swiglu(h), down)
    return jnp.einsum("ned,ne->nd", y, combine)


def _grouped(lhs: jax.Array, rhs: jax.Array, sizes: jax.Array) -> jax.Array:
    """lhs [m, c] rows grouped by expert (sizes [e]) times each group's rhs[g] [out, c] transposed."""
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    return jax.lax.ragged_dot_general(lhs, rhs, sizes, dims)


def _ragged(x, weights, idx, gate_up, down):
    n, k = idx.shape
    e = gate_up.shape[0]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # (token, slot) pairs sorted by expert
    token = order // k
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    h = _grouped(jnp.take(x, token, axis=0), gate_up, sizes)  # [m, 2f]
    y = _grouped(_swiglu(h), down, sizes)  # [m, d]
    y = y * jnp.take(weights.reshape(-1), order)[:, None]
    return jnp.zeros_like(x).at[token].add(y)


def scan_rows(tokens: int, k: int, experts: int) -> int:
    """"scan"'s tokens per step. One while tokens * k <= experts: a matrix-vector product, which XLA
    CPU fuses with the slice of the expert's weights (read in place, no copy). Above that a small
    matmul per step, for which XLA copies the slice first: about twice the mean tokens per expert
    (a power of two, 8 to 128), so that the copies and the loop's steps stay few (measured best at
    64 and 512 tokens, docs/performance.md)."""
    pairs = tokens * k
    if pairs <= experts:
        return 1
    return min(128, max(8, 1 << (2 * pairs // experts - 1).bit_length()))


def _scan(x, weights, idx, gate_up, down, rows):
    n, k = idx.shape
    e = gate_up.shape[0]
    m = n * k
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # (token, slot) pairs sorted by expert
    token = order // k
    pair_w = jnp.take(weights.reshape(-1), order)
    if rows == 1:  # one step per pair: its expert, its token
        expert = jnp.take(flat, order)
        steps, total = m, None
    else:  # one step per `rows` pairs of one expert: expert u takes ceil(sizes[u] / rows) steps
        sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
        chunks = (sizes + rows - 1) // rows
        ends = jnp.cumsum(chunks)
        total = ends[-1]
        # sum_u ceil(sizes[u] / rows) <= (m + min(e, m) * (rows - 1)) / rows: a static bound
        steps = (m + min(e, m) * (rows - 1)) // rows
        t = jnp.arange(steps, dtype=jnp.int32)
        expert = jnp.minimum(jnp.searchsorted(ends, t, side="right"), e - 1).astype(jnp.int32)
        within = (t - (ends[expert] - chunks[expert])) * rows
        start = jnp.cumsum(sizes)[expert] - sizes[expert] + within
        valid = sizes[expert] - within
        token = jnp.concatenate([token, jnp.zeros((rows,), token.dtype)])
        pair_w = jnp.concatenate([pair_w, jnp.zeros((rows,), pair_w.dtype)])

    def one(i, y):
        # a vector times the transposed slice: XLA CPU fuses the slice into this product and reads the
        # weights in place (in `matmul_t`'s form it copies the slice first; tests check the HLO)
        gu = jax.lax.dynamic_index_in_dim(gate_up, expert[i], keepdims=False)
        dn = jax.lax.dynamic_index_in_dim(down, expert[i], keepdims=False)
        h = x[token[i]] @ gu.T
        return y.at[token[i]].add((_swiglu(h) @ dn.T) * pair_w[i])

    def step(i, y):
        toks = jax.lax.dynamic_slice_in_dim(token, start[i], rows)
        w = jax.lax.dynamic_slice_in_dim(pair_w, start[i], rows)
        w = jnp.where(jnp.arange(rows) < valid[i], w, jnp.zeros_like(w))
        gu = jax.lax.dynamic_index_in_dim(gate_up, expert[i], keepdims=False)  # [2f, d]
        dn = jax.lax.dynamic_index_in_dim(down, expert[i], keepdims=False)  # [d, f]
        h = matmul_t(jnp.take(x, toks, axis=0), gu)
        return y.at[toks].add(matmul_t(_swiglu(h), dn) * w[:, None])

    if total is None:
        return jax.lax.fori_loop(0, steps, one, jnp.zeros_like(x))
    return jax.lax.fori_loop(0, steps, lambda i, y: jax.lax.cond(i < total, step, lambda i, y: y, i, y),
                             jnp.zeros_like(x))
