"""The engine's CPU kernels (`qvl_jax.engine.cpu_kernel`) against the XLA paths they replace: the
decode attention against gathering each row's window from the pools, then `attention.attend` (itself
tested against transformers' attention through the decoder parity tests); the row lookup and the
in-place row write against jnp.take and XLA's scatter, bit for bit; a bfloat16 engine against
model.generate."""

from __future__ import annotations

import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qvl_jax.engine import cpu_kernel
from qvl_jax.errors import InputError
from qvl_jax.modeling import attention


def _case(rng, rows, heads, kv, h, bs, blocks, dtype):
    slots = (rows * blocks + 3) * bs
    kp = jnp.asarray(rng.randn(slots, kv, h), dtype)
    vp = jnp.asarray(rng.randn(slots, kv, h), dtype)
    table = rng.permutation(slots // bs)[:rows * blocks].reshape(rows, blocks).astype(np.int32)
    q = jnp.asarray(rng.randn(rows, heads, h) * 2, dtype)
    window = blocks * bs
    j = np.arange(window)
    lo = rng.randint(0, window // 3, rows)
    hi = rng.randint(window // 2, window + 1, rows)
    mask = (j[None] >= lo[:, None]) & (j[None] < hi[:, None])
    mask[0, 5] = False  # a hole inside a row's range
    if rows > 2:
        mask[2] = False  # an idle row
    return q, kp, vp, table, mask


def _xla(q, kp, vp, table, mask, bs):
    """The XLA path: gather each row's window through its table, then attend."""
    rows, heads, h = q.shape
    read = table[:, :, None] * bs + np.arange(bs)
    read = read.reshape(rows, -1)
    out = attention.attend(q[:, None], kp[read], vp[read], jnp.asarray(mask)[:, None, :])
    return out.reshape(rows, heads, h)


@pytest.mark.parametrize("rows,heads,kv,h,bs,blocks,dtype,tol", [
    (8, 16, 8, 128, 16, 12, jnp.float32, 2e-6),   # the 2B model's heads, whole-row tasks
    (1, 16, 8, 128, 16, 9, jnp.float32, 2e-6),    # one row: split over kv heads
    (3, 4, 2, 8, 4, 7, jnp.float32, 2e-6),        # a tiny head_dim (below one 16-lane step)
    (5, 6, 2, 20, 4, 5, jnp.float32, 2e-6),       # 3 query heads per kv head, head_dim 16 + 4
    (4, 8, 8, 64, 8, 6, jnp.float32, 2e-6),       # no grouping
    (3, 4, 2, 16, 4, 9, jnp.float32, 2e-6),       # one 16-lane step a head (the tiny model's head_dim)
    (8, 16, 8, 128, 16, 12, jnp.bfloat16, 1e-2),  # bfloat16 pools and activations
])
def test_kernel_equals_gather_then_attend(rows, heads, kv, h, bs, blocks, dtype, tol):
    rng = np.random.RandomState(rows * 100 + h)
    q, kp, vp, table, mask = _case(rng, rows, heads, kv, h, bs, blocks, dtype)
    got = jax.jit(cpu_kernel.paged_decode, static_argnums=5)(q, kp, vp, jnp.asarray(table), jnp.asarray(mask), bs)
    assert got.dtype == dtype and got.shape == q.shape
    want = _xla(q, kp, vp, table, mask, bs)
    live = mask.any(1)
    np.testing.assert_allclose(np.asarray(got[live], np.float32), np.asarray(want[live], np.float32), rtol=tol, atol=tol)
    assert not np.asarray(got[~live], np.float32).any()  # an idle row: zeros, never NaN


def _chunk_case(rng, rows, t, heads, kv, h, bs, blocks, dtype):
    """Pools, tables, t queries a row and their masks as a prefill chunk sees them: query i of a row at
    cache index offset + i sees indices lo.. up to itself, padding queries (past the row's n real
    tokens) up to the last real one; one query (and any whose index is below lo) sees nothing; every slot no query may see is NaN."""
    slots = (rows * blocks + 3) * bs
    kp = rng.randn(slots, kv, h).astype(np.float32)
    vp = rng.randn(slots, kv, h).astype(np.float32)
    table = rng.permutation(slots // bs)[:rows * blocks].reshape(rows, blocks).astype(np.int32)
    q = jnp.asarray(rng.randn(rows, t, heads, h) * 2, dtype)
    window = blocks * bs
    j = np.arange(window)
    mask = np.zeros((rows, t, window), bool)
    for r in range(rows):
        offset, n, lo = rng.randint(0, window - t + 1), rng.randint(1, t + 1), rng.randint(0, 3)
        index = offset + np.minimum(np.arange(t), n - 1)
        mask[r] = (j[None] >= lo) & (j[None] <= index[:, None])
    mask[0, 1] = False  # a query with no allowed key
    seen = np.zeros(slots, bool)
    for r in range(rows):
        seen[(table[r][:, None] * bs + np.arange(bs)).reshape(-1)[mask[r].any(axis=0)]] = True
    kp[~seen], vp[~seen] = np.nan, np.nan
    return q, jnp.asarray(kp, dtype), jnp.asarray(vp, dtype), table, mask


@pytest.mark.parametrize("rows,t,heads,kv,h,bs,blocks,dtype,tol", [
    (1, 45, 16, 8, 128, 16, 8, jnp.float32, 2e-6),   # the 2B model's heads: the vector tiles
    (3, 21, 4, 2, 8, 4, 9, jnp.float32, 2e-6),       # a tiny head_dim: the scalar weighted sums
    (2, 17, 6, 2, 20, 4, 7, jnp.float32, 2e-6),      # 3 query heads per kv head, head_dim 16 + 4
    (2, 40, 8, 8, 64, 8, 8, jnp.float32, 2e-6),      # no grouping
    (1, 45, 16, 8, 128, 16, 8, jnp.bfloat16, 1e-2),  # bfloat16 pools and activations (AMX tiles or AVX512_BF16 where the CPU has them)
    (2, 37, 6, 2, 64, 8, 9, jnp.bfloat16, 1e-2),     # bfloat16, 3 query heads per kv head, head_dim 64
    (1, 19, 4, 2, 20, 4, 8, jnp.bfloat16, 1e-2),     # bfloat16 with a head_dim the tiles do not take
])
def test_prefill_kernel_equals_gather_then_attend(rows, t, heads, kv, h, bs, blocks, dtype, tol):
    rng = np.random.RandomState(rows * 100 + t + h)
    q, kp, vp, table, mask = _chunk_case(rng, rows, t, heads, kv, h, bs, blocks, dtype)
    got = jax.jit(cpu_kernel.paged_prefill, static_argnums=5)(q, kp, vp, jnp.asarray(table), jnp.asarray(mask), bs)
    assert got.dtype == dtype and got.shape == q.shape
    read = (table[:, :, None] * bs + np.arange(bs)).reshape(rows, -1)
    # The reference reads every window slot: the ones no query may see hold zeros for it (a NaN there
    # would reach every output through the 0 * NaN of its weighted sum, in XLA's product as in any).
    seen = mask.any(axis=1)[:, :, None, None]
    keys, values = (jnp.where(seen, p[read], 0) for p in (kp, vp))
    want = attention.attend(q, keys, values, jnp.asarray(mask)).reshape(q.shape)
    live = mask.any(axis=2)
    assert not live[0, 1] and live.sum() >= live.size // 2
    np.testing.assert_allclose(np.asarray(got[live], np.float32), np.asarray(want[live], np.float32), rtol=tol, atol=tol)
    assert np.all(np.asarray(got[~live], np.float32) == 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_packed_prefill_kernel_equals_each_row_alone(dtype):
    """The chunks of several rows packed into one sequence (a mixed step's): each row's first n_r
    queries (one row none, one longer than a 16-query block) at starts, tokens before the first and
    after the last row's zero; each packed token gets bit for bit what `paged_prefill` gives it in
    its own row (itself tested against gather-then-attend above): the same query blocks, the same
    arithmetic."""
    rows, t, heads, kv, h, bs, blocks = 4, 37, 16, 8, 128, 16, 8
    rng = np.random.RandomState(11)
    q, kp, vp, table, mask = _chunk_case(rng, rows, t, heads, kv, h, bs, blocks, dtype)
    alone = jax.jit(cpu_kernel.paged_prefill, static_argnums=5)(q, kp, vp, jnp.asarray(table), jnp.asarray(mask), bs)
    n = [20, 0, 5, 37]
    starts = np.concatenate([[3], 3 + np.cumsum(n)]).astype(np.int32)
    total = int(starts[-1]) + 6
    qp = np.zeros((1, total, heads, h), np.float32)
    mp = np.zeros((1, total, blocks * bs), bool)
    for r in range(rows):
        qp[0, starts[r]:starts[r + 1]] = np.asarray(q[r, :n[r]], np.float32)
        mp[0, starts[r]:starts[r + 1]] = mask[r, :n[r]]
    qp[0, :3] = qp[0, starts[-1]:] = 1.0  # outside every row: zeros out
    mp[0, :3] = mp[0, starts[-1]:] = True
    got = jax.jit(cpu_kernel.paged_prefill_packed, static_argnums=6)(
        jnp.asarray(qp, dtype), kp, vp, jnp.asarray(table), jnp.asarray(mp), jnp.asarray(starts), bs)
    assert got.dtype == dtype and got.shape == qp.shape
    for r in range(rows):
        np.testing.assert_array_equal(np.asarray(got[0, starts[r]:starts[r + 1]], np.float32),
                                      np.asarray(alone[r, :n[r]], np.float32))
    assert not np.asarray(got[0, :3], np.float32).any() and not np.asarray(got[0, starts[-1]:], np.float32).any()
    with pytest.raises(Exception, match="starts must ascend"):
        cpu_kernel.paged_prefill_packed(jnp.asarray(qp, dtype), kp, vp, jnp.asarray(table), jnp.asarray(mp),
                                        jnp.asarray(starts[::-1].copy()), bs).block_until_ready()


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 1e-2)])
def test_vision_block_attention_kernel_equals_xla(dtype, tol):
    """`cpu_kernel.block_attention` (the engine's vision blocks) is `vision.block_attention`: three
    blocks of 40 patches, two frames packed in one, padding in another; each patch sees only its own
    frame. Padding patches (no allowed key) get zeros, where XLA's softmax averages every value:
    they are dropped before the merger either way."""
    from qvl_jax.modeling.vision import block_attention

    rng = np.random.RandomState(12)
    blocks, size = 3, 40
    q, k, v = (jnp.asarray(rng.randn(blocks * size, 4, 64), dtype) for _ in range(3))
    frame = np.zeros((blocks, size), np.int32)
    frame[1, 25:] = 1  # two frames in block 1
    frame[2, 33:] = -1  # padding at the end of block 2
    mask = jnp.asarray((frame[:, :, None] == frame[:, None, :]) & (frame[:, None, :] >= 0))
    got = jax.jit(cpu_kernel.block_attention)(q, k, v, mask)
    want = jax.jit(block_attention)(q, k, v, mask)
    assert got.dtype == dtype and got.shape == q.shape
    live = (frame >= 0).reshape(-1)
    np.testing.assert_allclose(np.asarray(got[live], np.float32), np.asarray(want[live], np.float32), rtol=tol, atol=tol)
    assert not np.asarray(got[~live], np.float32).any()


@pytest.mark.parametrize("m, k, n", [(7, 64, 96), (33, 96, 32), (130, 160, 64), (1, 64, 320), (8, 96, 320),
                                     (26, 1024, 64), (300, 1024, 160)])
def test_packed_product_equals_xla_product(m, k, n):
    """gemm_packed(x, pack_weight(w)) is x . w^T: within the bfloat16 rounding of the float64 product
    (and float32 sums); on the tile unit bit for bit XLA's own bfloat16 product (`matmul_t`), whose
    AMX sums run in the same order, and its float32 sums those of XLA's dot with a float32 result.
    A misplaced pair or block in the packing fails both. The shapes reach each AVX512_BF16 path: a
    decode step's rows (1 row by 8 panels and single panels, 7 and 8 rows by single panels), a prompt
    chunk's (blocks of 12 rows and a rest, two slices of the contraction, two chunks of rows, a
    task of 4 panels and one of 1)."""
    from qvl_jax.modeling.layers import matmul_t

    rng = np.random.RandomState(3)
    x = jnp.asarray(rng.randn(m, k), jnp.bfloat16)
    w = jnp.asarray(rng.randn(n, k) * 0.1, jnp.bfloat16)
    y = np.asarray(jax.jit(cpu_kernel.gemm_packed)(x, cpu_kernel.pack_weight(w)), np.float64)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    ref = x64 @ w64.T
    bound = 2.0 ** -8 * np.abs(ref) + 2.0 ** -20 * (np.abs(x64) @ np.abs(w64).T)
    assert (np.abs(y - ref) <= bound).all()
    if cpu_kernel.tile_products():
        np.testing.assert_array_equal(y, np.asarray(jax.jit(matmul_t)(x, w), np.float64))
        sums = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32))
        np.testing.assert_array_equal(np.asarray(cpu_kernel.gemm_packed(x, cpu_kernel.pack_weight(w), jnp.float32)),
                                      np.asarray(sums(x, w)))
    with pytest.raises(ValueError, match="multiples of 32"):
        cpu_kernel.pack_weight(w[:, :k - 1])
    with pytest.raises(TypeError, match="bfloat16"):
        cpu_kernel.gemm_packed(x.astype(jnp.float32), cpu_kernel.pack_weight(w))


@pytest.mark.parametrize("m, lo, hi", [(8, 3, 6), (60, 20, 50), (60, 24, 48), (300, 100, 290), (40, 0, 40)])
def test_packed_product_skips_rows(m, lo, hi):
    """skip=(lo, hi) (a mixed step's padding): those rows come out as zeros, every other row as without
    it, bit for bit; the rows of x there may hold anything (NaN here). Cases: a decode step's rows,
    blocks of 12 rows wholly and partly inside the range, two chunks of rows, every row."""
    rng = np.random.RandomState(5)
    x = rng.randn(m, 96).astype(np.float32)
    w = jnp.asarray(rng.randn(64, 96) * 0.1, jnp.bfloat16)
    wp = cpu_kernel.pack_weight(w)
    whole = np.asarray(cpu_kernel.gemm_packed(jnp.asarray(x, jnp.bfloat16), wp, jnp.float32))
    x[lo:hi] = np.nan
    got = np.asarray(jax.jit(lambda x, wp, lo: cpu_kernel.gemm_packed(x, wp, jnp.float32, skip=(lo, hi)))(
        jnp.asarray(x, jnp.bfloat16), wp, lo))
    keep = np.r_[0:lo, hi:m]
    np.testing.assert_array_equal(got[keep], whole[keep])
    assert not got[lo:hi].any()


def test_packed_product_skips_only_in_a_product_of_the_named_rows(monkeypatch):
    """Under skip_rows (as steps.mixed traces its decoder), a packed product over that many rows leaves
    the named rows out; one over other rows (the lm_head's over the step's rows), or outside, none."""
    from qvl_jax.engine import packed

    seen = []
    real = cpu_kernel.gemm_packed
    monkeypatch.setattr(cpu_kernel, "gemm_packed", lambda x, wp, out_dtype=jnp.bfloat16, skip=None:
                        seen.append((x.size // x.shape[-1], skip)) or real(x, wp, out_dtype, skip))
    x, wp = jnp.zeros((1, 40, 64), jnp.bfloat16), cpu_kernel.pack_weight(jnp.zeros((32, 64), jnp.bfloat16))
    with packed.skip_rows(40, 30, 36):
        packed.product(x, wp)
        packed.product(x[:, :8], wp)
    packed.product(x, wp)
    assert seen == [(40, (30, 36)), (8, None), (40, None)]


def test_bfloat16_product_is_rounded_before_a_float32_op():
    """`matmul_t`'s bfloat16 product reaches the next op rounded to bfloat16, also where that op takes
    it to float32 inside the same jit (q_norm after q_proj, at a prompt chunk's rows and 16 heads of
    128), as torch rounds it and as `gemm_packed` returns it. Without `reduce_precision` XLA's
    default excess precision hands the norm the float32 sums here (277,020 of 1,064,960 outputs
    differed), and the engine's packed and unpacked weights then gave different tokens."""
    from qvl_jax.modeling.layers import matmul_t, rms_norm

    rng = np.random.RandomState(4)
    x = jnp.asarray(rng.randn(520, 256), jnp.bfloat16)
    w = jnp.asarray(rng.randn(2048, 256) * 0.05, jnp.bfloat16)
    g = jnp.asarray(1 + rng.rand(128), jnp.bfloat16)

    def norm(y):
        return rms_norm(y.reshape(520, 16, 128), g, 1e-6)

    fused = jax.jit(lambda x, w: norm(matmul_t(x, w)))(x, w)
    apart = jax.jit(norm)(jax.jit(matmul_t)(x, w))  # the product stored, so rounded
    np.testing.assert_array_equal(np.asarray(fused, np.float32), np.asarray(apart, np.float32))
    if cpu_kernel.tile_products():
        packed = jax.jit(lambda x, wp: norm(cpu_kernel.gemm_packed(x, wp)))(x, cpu_kernel.pack_weight(w))
        np.testing.assert_array_equal(np.asarray(fused, np.float32), np.asarray(packed, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32])
def test_take_rows_equals_take(dtype):
    """Rows of a table at ids of any shape, bit for bit jnp.take's, inside a jitted loop too (how a
    decode step looks tokens up); an id outside the table gives a zero row."""
    rng = np.random.RandomState(5)
    table = jnp.asarray(rng.randn(50, 3, 7) * 100, dtype)
    ids = jnp.asarray(rng.randint(0, 50, (4, 6)), jnp.int32)
    got = jax.jit(cpu_kernel.take_rows)(table, ids)
    assert got.dtype == dtype and got.shape == (4, 6, 3, 7)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.take(table, ids, axis=0)))

    def loop(table, ids, f):
        return jax.lax.fori_loop(0, 3, lambda i, acc: acc + f(table, (ids + i) % 50).astype(jnp.float32),
                                 jnp.zeros((*ids.shape, 3, 7), jnp.float32))
    np.testing.assert_array_equal(jax.jit(loop, static_argnums=2)(table, ids, cpu_kernel.take_rows),
                                  jax.jit(loop, static_argnums=2)(table, ids, lambda t, i: jnp.take(t, i, axis=0)))
    edge = cpu_kernel.take_rows(table, jnp.asarray([49, 50, -1, 0]))
    np.testing.assert_array_equal(np.asarray(edge[0]), np.asarray(table[49]))
    assert not np.asarray(edge[1:3]).any()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_put_rows_equals_scatter(dtype):
    """Rows written at indices, bit for bit XLA's scatter: inside a jitted loop over a donated table
    (where XLA hands the kernel the table's own buffer, as a decode loop's pools), reading the table
    between writes; an index outside the table is dropped. A dtype or shape mismatch is an error."""
    rng = np.random.RandomState(7)
    table = jnp.asarray(rng.randn(40, 2, 5), dtype)
    at = jnp.asarray(rng.permutation(40)[:6].reshape(3, 2), jnp.int32).at[1, 1].set(40)  # one outside
    rows = jnp.asarray(rng.randn(3, 2, 2, 5), dtype)

    def loop(table, put):
        def body(i, carry):
            t, seen = carry
            t = put(t, at[i], rows[i] + t[i].astype(dtype))  # reads the table it writes
            return t, seen + t.astype(jnp.float32).sum()
        return jax.lax.fori_loop(0, 3, body, (table, jnp.zeros((), jnp.float32)))

    want = jax.jit(loop, static_argnums=1)(table, lambda t, i, r: t.at[i].set(r))
    got = jax.jit(loop, static_argnums=1, donate_argnums=0)(jnp.array(table), cpu_kernel.put_rows)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    kept = jnp.array(table)
    out = jax.jit(cpu_kernel.put_rows)(kept, at[0], rows[0])  # not donated: the caller's table is kept
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(table))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(table.at[at[0]].set(rows[0])))
    with pytest.raises(TypeError, match="put_rows: rows float16"):
        cpu_kernel.put_rows(table, at[0], rows[0].astype(jnp.float16))


@pytest.mark.parametrize("packed", [False, True])
def test_bfloat16_engine_equals_generate(hf_checkpoint, converted, tmp_path, packed):
    """A bfloat16 engine on the CPU (its pools written and its tokens looked up by the kernels, decode
    rows attending through the decode kernel; packed: its decoder products through
    `cpu_kernel.gemm_packed` over packed weights) gives model.generate's tokens in bfloat16 (XLA's
    scatter, lookup, gather and products), as requests come and go. A first difference is allowed
    only at a bfloat16 tie: the logits are bfloat16 values, and where the top two are one bfloat16
    step apart a different order of additions anywhere (a chunked prompt, a mixed step's rows) can
    swap them (the packed product is XLA's bit for bit, and rounded where `matmul_t` rounds). The engine without the
    kernels (`cpu_kernel=False`) meets that tie in the 40-token prompt too (token 8, top two
    2.40625 / 2.390625), with the same tokens as the kernels."""
    import qvl_jax
    from mm_inputs import PromptBuilder
    from test_engine import _alone, _one

    hf, _ = hf_checkpoint("untied")
    m = qvl_jax.load(converted("untied"), dtype="bfloat16")
    rng = np.random.RandomState(2)
    cases = [(_one(PromptBuilder(rng).text(n), hf, rng), k) for n, k in ((5, 14), (40, 9), (3, 22))]
    cases.append((_one(PromptBuilder(rng).text(4).image(4, 4).text(6), hf, rng), 12))
    eng = m.engine(max_num_seqs=4, max_model_len=128, block_size=4, num_blocks=140, decode_steps=4,
                   max_num_batched_tokens=32, cpu_kernel=True, packed_weights=packed)
    assert eng._cpu and str(m.dtype) == "bfloat16" and (eng.packed_weights_off is None) == packed
    if packed:  # the steps see packed weights (the projections whose dims are multiples of 32)
        assert sum(type(v).__name__ == "PackedWeight" for v in jax.tree.leaves(
            nnx.state(eng.params[0].merge(eng.params[1])), is_leaf=lambda x: isinstance(x, nnx.Variable))) > 0
    outs = [eng.submit(inp, max_new_tokens=k, stop_token_ids=[]) for inp, k in cases]
    got = [o.result(timeout=120).tokens for o in outs]
    eng.close()
    for (inp, k), toks in zip(cases, got):
        ref, logits = _alone(m, inp, k)
        assert len(toks) == k
        diff = np.flatnonzero(toks != ref[0])
        if diff.size:  # a tie in bfloat16: the top two logits one bfloat16 step apart, or equal
            top2 = np.sort(logits[0, diff[0]])[-2:]
            step = 2.0 ** (np.floor(np.log2(abs(top2[1]))) - 7)  # bfloat16 keeps 8 significant bits
            assert top2[1] - top2[0] <= step, f"differs at step {diff[0]} (margin {top2[1] - top2[0]})"


def test_packed_weights_refused_where_they_cannot_run(jax_model):
    """packed_weights=True on a float32 model (or without the CPU kernels) is a clear error, not a
    silent fallback."""
    with pytest.raises(InputError, match="packed_weights=True cannot run here: the model is float32"):
        jax_model("untied").engine(max_num_seqs=1, max_model_len=64, num_blocks=20, packed_weights=True)
    with pytest.raises(InputError, match="packed_weights=True cannot run here: the engine does not run the CPU"):
        jax_model("untied").engine(max_num_seqs=1, max_model_len=64, num_blocks=20, cpu_kernel=False,
                                   packed_weights=True)


def test_packed_weights_by_default_where_the_tile_unit_runs_them(jax_model, converted, monkeypatch):
    """By default a bfloat16 engine packs its decoder weights where the kernels' product runs on AMX
    tiles and the copy fits in half of the host memory beside the pool; elsewhere it says why not,
    and a float32 model or packed_weights=False never packs."""
    import qvl_jax
    from qvl_jax.engine import engine as engine_mod

    kw = dict(max_num_seqs=1, max_model_len=64, num_blocks=20)
    eng = jax_model("untied").engine(**kw)
    assert "float32" in eng.packed_weights_off
    # float32 too: the vision blocks attend through the CPU kernel in the engine's view, not the model's
    attn = eng.params[0].merge(eng.params[1]).model.visual.blocks[0].attn
    assert attn.attend_kernel is cpu_kernel.block_attention
    assert getattr(eng.model.module.model.visual.blocks[0].attn, "attend_kernel", None) is None
    assert jax_model("untied").engine(cpu_kernel=False, **kw).params is jax_model("untied").split
    m = qvl_jax.load(converted("untied"), dtype="bfloat16")

    def packed_leaves(eng):
        return sum(type(v).__name__ == "PackedWeight" for v in jax.tree.leaves(
            nnx.state(eng.params[0].merge(eng.params[1])), is_leaf=lambda x: isinstance(x, nnx.Variable)))

    eng = m.engine(**kw)
    if cpu_kernel.product_unit() is not None:
        assert eng.packed_weights_off is None and packed_leaves(eng) > 0
    else:
        assert "AMX" in eng.packed_weights_off and packed_leaves(eng) == 0
    eng = m.engine(packed_weights=False, **kw)
    assert eng.packed_weights_off == "packed_weights=False" and packed_leaves(eng) == 0
    monkeypatch.setattr(engine_mod, "device_free_bytes", lambda: 4096)  # no room for the copy
    eng = m.engine(**kw)
    assert eng.packed_weights_off is not None and packed_leaves(eng) == 0
    if cpu_kernel.product_unit() is not None:
        assert "half of the free host memory" in eng.packed_weights_off


def test_kernel_reads_only_the_allowed_keys():
    """A key outside the mask never reaches the answer, even an infinite or NaN one (whatever a
    trash block or a freed block holds): the answer is bit for bit the one over clean pools."""
    rng = np.random.RandomState(3)
    q, kp, vp, table, mask = _case(rng, 4, 8, 4, 32, 4, 6, jnp.float32)
    outside = table[:, :, None] * 4 + np.arange(4)
    outside = outside.reshape(4, -1)[~mask]
    kp, vp = kp.at[outside].set(jnp.inf), vp.at[outside].set(jnp.nan)
    got = cpu_kernel.paged_decode(q, kp, vp, jnp.asarray(table), jnp.asarray(mask), 4)
    assert np.isfinite(np.asarray(got)).all()
    clean = _case(np.random.RandomState(3), 4, 8, 4, 32, 4, 6, jnp.float32)
    np.testing.assert_allclose(got, cpu_kernel.paged_decode(*clean[:3], jnp.asarray(table), jnp.asarray(mask), 4),
                               rtol=0, atol=0)


def test_a_failed_build_leaves_nothing_and_says_why(tmp_path, monkeypatch):
    """No working compiler: a one-line reason, no library (or temporary file) left in the cache."""
    cxx = tmp_path / "broken-c++"
    cxx.write_text("#!/bin/sh\necho 'cpu_kernels.cc:1: error: this compiler is broken' >&2\nexit 1\n")
    cxx.chmod(cxx.stat().st_mode | stat.S_IEXEC)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("QVL_JAX_CACHE", str(cache))
    with pytest.raises(RuntimeError, match="broken-c\\+\\+ failed: .*this compiler is broken") as e:
        cpu_kernel._build()
    assert "\n" not in str(e.value)
    assert not list((cache / "kernels").iterdir())


def test_build_is_cached(tmp_path, monkeypatch):
    """A second build of the same source finds the library and compiles nothing."""
    monkeypatch.setenv("QVL_JAX_CACHE", str(tmp_path))
    first = cpu_kernel._build()
    assert first.parent == tmp_path / "kernels" and first.exists()

    def no_compile(*a, **k):
        raise AssertionError("compiled again")

    monkeypatch.setattr(cpu_kernel.subprocess, "run", no_compile)
    assert cpu_kernel._build() == first
    assert [p.name for p in first.parent.iterdir()] == [first.name]


def test_engine_setting(monkeypatch, jax_model):
    """cpu_kernel=True where the kernel cannot run is a clear error; the default then runs XLA's gather."""
    m = jax_model("tied")
    eng = m.engine(max_num_seqs=2, max_model_len=64)
    assert eng._cpu  # the default where it can run
    eng.close()
    monkeypatch.setattr(cpu_kernel, "unavailable_reason", lambda: "no C++ compiler found (set CXX)")
    with pytest.raises(InputError, match="cpu_kernel=True cannot run here: no C\\+\\+ compiler found"):
        m.engine(max_num_seqs=2, max_model_len=64, cpu_kernel=True)
    eng = m.engine(max_num_seqs=2, max_model_len=64)
    assert not eng._cpu
    eng.close()
