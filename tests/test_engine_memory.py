"""The KV pool's memory is a bound the user sets: `Engine(kv_cache_memory=...)` in bytes or sizes such as
"4GiB"; without it, half the free memory at start, and on the CPU at most 4 GiB (it was sized from the
machine's free RAM, 8,192 blocks for the tiny model, so a busy 2B server could grow into most of it)."""

from __future__ import annotations

import numpy as np
import pytest

import qvl_jax
from qvl_jax.engine import engine as engine_mod
from qvl_jax.engine import memory, paged
from qvl_jax.errors import InputError


@pytest.fixture(scope="module")
def model():
    return qvl_jax.load("tiny-random")


def test_parse_size():
    assert [memory.parse_size(s) for s in ("4GiB", "512MiB", "1.5 GiB", "2GB", "1000", 4096, np.int64(7))] == [
        4 << 30, 512 << 20, 3 << 29, 2 * 10**9, 1000, 4096, 7]
    for bad in ("", "x", "4XB", "-1", "0", 0, 1.5, True, None):
        with pytest.raises(InputError, match="kv_cache_memory"):
            memory.parse_size(bad)


def test_kv_cache_memory_bounds_the_pool(model):
    per_block = paged.block_bytes(model.config.text, 16, model.dtype)
    eng = model.engine(max_num_seqs=8, max_model_len=256, kv_cache_memory="2MiB")
    try:
        assert eng.num_blocks == (2 << 20) // per_block and eng.kv_cache_bytes == eng.num_blocks * per_block
        assert eng.kv_cache_bytes <= 2 << 20
        # It serves: one request through the bounded pool equals model.generate's greedy answer.
        ids = np.asarray([[5, 6, 7, 8]])
        want = model.generate(input_ids=ids, max_new_tokens=8, stop_token_ids=[]).tokens[0].tolist()
        assert eng.submit({"input_ids": ids}, max_new_tokens=8, stop_token_ids=[]).result().tokens.tolist() == want
    finally:
        eng.close()
    # Never more than every slot at max_model_len can use.
    eng = model.engine(max_num_seqs=1, max_model_len=256, kv_cache_memory=1 << 30)
    assert eng.num_blocks == 256 // 16 + 1
    eng.close()
    with pytest.raises(InputError, match=rf"kv_cache_memory=64 KiB holds {(64 << 10) // per_block} KV blocks; "
                                         r"one sequence of max_model_len=256 needs 17"):
        model.engine(max_model_len=256, kv_cache_memory="64KiB")
    with pytest.raises(InputError, match="kv_cache_memory must be a size"):
        model.engine(max_model_len=256, kv_cache_memory="lots")


def test_cpu_default_is_capped(model, monkeypatch):
    """Without a size, the pool takes memory_fraction of free memory, and on the CPU at most
    CPU_DEFAULT_BYTES (4 GiB; made small here so that the test allocates little)."""
    assert memory.pool_budget(None, 0.5, 100 << 30, cpu=True) == (4 << 30, False)
    assert memory.pool_budget(None, 0.5, 100 << 30, cpu=False) == (50 << 30, False)
    assert memory.pool_budget(None, 0.5, 2 << 30, cpu=True) == (1 << 30, False)
    assert memory.pool_budget("1GiB", 0.5, 100 << 30, cpu=True) == (1 << 30, True)
    per_block = paged.block_bytes(model.config.text, 16, model.dtype)
    monkeypatch.setattr(engine_mod, "device_free_bytes", lambda: 1 << 40)
    monkeypatch.setattr(memory, "CPU_DEFAULT_BYTES", 96 * per_block)
    eng = model.engine(max_num_seqs=16, max_model_len=1024)
    assert eng.num_blocks == 96 and eng.kv_cache_bytes == 96 * per_block
    eng.close()
