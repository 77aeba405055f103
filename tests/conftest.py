"""Shared fixtures: tiny random HF checkpoints written once per session, and their conversions."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

# Tests compare float32 against PyTorch: full-precision matmuls on every backend.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# 8 fake CPU devices for the sharding tests (JAX reads this once, at start); everything else still
# runs on the first device.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(__file__))
# Never the user's cache (~/.cache/qvl_jax or their $QVL_JAX_CACHE): tiny-random and the HF
# directories qvl_jax.load converts go into one temporary cache per session.
_CACHE = tempfile.mkdtemp(prefix="qvl_jax_test_cache_")
os.environ["QVL_JAX_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from hf_models import TINY_CONFIGS, save_tiny  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """name -> (HF torch model, checkpoint dir); built on first use."""
    cache = {}

    def get(name: str):
        if name not in cache:
            path = tmp_path_factory.mktemp(f"hf_{name}")
            cache[name] = (save_tiny(name, path), path)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def converted(hf_checkpoint, tmp_path_factory):
    """name -> converted float32 qvl_jax directory (through the real converter)."""
    from qvl_jax.convert import convert_checkpoint

    cache = {}

    def get(name: str):
        if name not in cache:
            _, hf_dir = hf_checkpoint(name)
            out = tmp_path_factory.mktemp(f"cv_{name}") / "model"
            cache[name] = convert_checkpoint(hf_dir, out, dtype="float32")
        return cache[name]

    return get


# The attention kernel the shared models load with (qvl_jax.load's attention=): "xla" unless
# QVL_JAX_TEST_ATTENTION says otherwise (scripts/gpu_check.sh runs the bf16 and engine tests under
# "cudnn" and "pallas" on a GPU).
TEST_ATTENTION = os.environ.get("QVL_JAX_TEST_ATTENTION", "xla")


@pytest.fixture(scope="session")
def jax_model(converted):
    import qvl_jax

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = qvl_jax.load(converted(name), attention=TEST_ATTENTION)
        return cache[name]

    return get


ALL_CONFIGS = sorted(TINY_CONFIGS)
