"""The engine's CPU decode-attention kernel (`qvl_jax.engine.cpu_kernel`) against the XLA path it
replaces: gather each row's window from the pools, then `attention.attend` (itself tested against
transformers' attention through the decoder parity tests)."""

from __future__ import annotations

import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    cxx.write_text("#!/bin/sh\necho 'paged_decode.cc:1: error: this compiler is broken' >&2\nexit 1\n")
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
