"""`matmul_t`, the one product every Linear and the tied lm_head run: x [..., in] times an
[out, in] weight transposed, computed with the weight on the left of the dot for 2 to
WEIGHT_LEFT_MAX_ROWS rows on the CPU (faster there), and as the plain dot otherwise. Both forms must
give torch's F.linear, values and gradients, at every row count and input rank."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qvl_jax.modeling import layers


@pytest.mark.parametrize("lead", [(1,), (2,), (8,), (2, 4), (layers.WEIGHT_LEFT_MAX_ROWS,),
                                  (layers.WEIGHT_LEFT_MAX_ROWS + 1,), (3, 50)])
def test_matmul_t_equals_torch_linear_values_and_gradients(lead):
    import torch

    r = np.random.RandomState(sum(lead))
    x, w, g = r.randn(*lead, 48).astype(np.float32), r.randn(40, 48).astype(np.float32), r.randn(*lead, 40)
    y, vjp = jax.vjp(jax.jit(layers.matmul_t), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g, jnp.float32))
    tx, tw = (torch.from_numpy(a).double().requires_grad_() for a in (x, w))
    ty = torch.nn.functional.linear(tx, tw)
    ty.backward(torch.from_numpy(g))
    assert y.shape == (*lead, 40)
    for ours, want in ((y, ty), (dx, tx.grad), (dw, tw.grad)):
        np.testing.assert_allclose(np.asarray(ours), want.detach().numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows,weight_left", [(1, False), (8, True), (layers.WEIGHT_LEFT_MAX_ROWS, True),
                                              (layers.WEIGHT_LEFT_MAX_ROWS + 1, False)])
def test_weight_is_the_left_operand_where_that_is_faster(rows, weight_left):
    """What makes the decode step fast on the CPU: in the compiled program the dot's output is
    [out, rows] (weight on the left). Without the optimization barrier XLA folds the transpose back
    into an [rows, out] dot, the slow form, and this fails."""
    assert jax.default_backend() == "cpu"
    x = jax.ShapeDtypeStruct((rows, 256), jnp.float32)
    w = jax.ShapeDtypeStruct((384, 256), jnp.float32)
    hlo = jax.jit(layers.matmul_t).lower(x, w).compile().as_text()
    assert (f"f32[384,{rows}]" in hlo) == weight_left, hlo
    assert f"f32[{rows},384]" in hlo  # the result, either way


@pytest.mark.parametrize("rows", [8, 64, layers.WEIGHT_LEFT_MAX_ROWS + 1])
def test_bfloat16_products_keep_their_weights_in_bfloat16(rows):
    """A bias and a GELU between two bfloat16 products (the vision MLP): after a weight-on-the-left
    product the transposed result must reach the next product row-major. XLA gives the transpose a
    column-major layout, the ops after it inherit it, and XLA:CPU then computes the next bfloat16
    product in float32 on a float32 copy of its whole weight, every call: the compiled program
    holds a float32 array of the weight's shape. `layers._round_row_major` prevents it (without it
    this fails at 8 and 64 rows)."""
    assert jax.default_backend() == "cpu"
    d, f = 96, 352

    def mlp(x, w1, b1, w2, b2):
        return layers.matmul_t(layers.gelu(layers.matmul_t(x, w1) + b1, approximate=True), w2) + b2

    shapes = [((rows, d),), ((f, d), (f,)), ((d, f), (d,))]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for group in shapes for s in group]
    hlo = jax.jit(mlp).lower(*args).compile().as_text()
    for out, inp in ((f, d), (d, f)):
        assert f"f32[{out},{inp}]" not in hlo, f"the [{out}, {inp}] weight is converted to float32"
    r = np.random.RandomState(rows)
    vals = [jnp.asarray(r.randn(*a.shape).astype(np.float32) * 0.1, jnp.bfloat16) for a in args]
    want = _reference_mlp(*[np.asarray(v, np.float32) for v in vals])
    got = np.asarray(jax.jit(mlp)(*vals), np.float32)
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.02)


def _reference_mlp(x, w1, b1, w2, b2):
    import torch

    t = [torch.from_numpy(a).to(torch.bfloat16) for a in (x, w1, b1, w2, b2)]
    h = torch.nn.functional.gelu(torch.nn.functional.linear(t[0], t[1], t[2]), approximate="tanh")
    return torch.nn.functional.linear(h, t[3], t[4]).float().numpy()
