"""Shared fixtures: tiny random HF checkpoints written once per session, and their conversions."""

from __future__ import annotations

import os
import sys

# Tests compare float32 against PyTorch: full-precision matmuls on every backend.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# 8 fake CPU devices for the sharding tests (JAX reads this once, at start); everything else still
# runs on the first device.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(__file__))

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


@pytest.fixture(scope="session")
def jax_model(converted):
    import qvl_jax

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = qvl_jax.load(converted(name))
        return cache[name]

    return get


ALL_CONFIGS = sorted(TINY_CONFIGS)
