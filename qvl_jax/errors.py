"""The exception family of qvl_jax.

Every error a user can cause (a bad checkpoint, a bad config, bad inputs) is raised as a subclass of
`QvlError`, with a one-line message that names the problem. Library code never lets such a problem
surface as a traceback from deep inside JAX.
"""

from __future__ import annotations

import contextlib
import os


class QvlError(Exception):
    """Base class of every error qvl_jax raises on purpose."""


class ConfigError(QvlError, ValueError):
    """A config.json that is malformed, or describes a model qvl_jax does not support."""


class CheckpointError(QvlError, ValueError):
    """A checkpoint (Hugging Face or converted) that is missing, corrupt, truncated or misshapen."""


class InputError(QvlError, ValueError):
    """Model inputs that are inconsistent or malformed (shapes, placeholder counts, types)."""


class NumericalError(QvlError, ArithmeticError):
    """The model produced NaN or inf logits (broken weights, or an overflow in a low-precision dtype)."""


class ResourceError(QvlError, MemoryError):
    """A request that would not fit in device memory, refused before anything is allocated."""


@contextlib.contextmanager
def device_memory_errors(what: str):
    """Turns XLA's out-of-memory failure inside the block (a JaxRuntimeError whose status is
    RESOURCE_EXHAUSTED: activations of a long prompt, many images, a large batch) into a one-line
    ResourceError. Every other error passes through unchanged."""
    import jax  # lazy: `import qvl_jax` and the CLI import errors and must not pay for JAX

    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        if "RESOURCE_EXHAUSTED" not in first:
            raise
        detail = first.replace("RESOURCE_EXHAUSTED:", "").strip()
        raise ResourceError(f"{what} ran out of device memory ({detail[:160]}): use fewer or smaller "
                            "images or videos, a shorter prompt or a smaller batch") from None


def device_free_bytes() -> int | None:
    """Free memory of this process's first device where the backend reports it (GPUs); host RAM on
    CPU. Only addressable devices report their memory: under a mesh spanning several hosts,
    jax.devices()[0] may be another host's."""
    import jax  # lazy: `import qvl_jax` and the CLI import errors and must not pay for JAX

    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return int(pages) * int(size)
    except (ValueError, OSError, AttributeError):
        return None
