"""How much memory the engine's KV pool may take, and how sizes are written.

The pool is the engine's one large allocation and grows resident as requests write into it, so its
size is a bound a user sets (vLLM: `VLLM_CPU_KVCACHE_SPACE` on CPU, `--gpu-memory-utilization` on
accelerators). `Engine(kv_cache_memory=...)` / `qvl-jax serve --kv-cache-memory` give bytes;
without them the pool takes `memory_fraction` of the free device memory at start, and on the CPU
(where that memory is the machine's RAM) at most `CPU_DEFAULT_BYTES`.
"""

from __future__ import annotations

import re

from qvl_jax.errors import InputError

CPU_DEFAULT_BYTES = 4 << 30  # leaves a machine usable; vLLM's CPU backend defaults to 4 GiB too

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(value, name: str = "kv_cache_memory") -> int:
    """Bytes from an int or a string such as "4GiB", "512MiB", "2GB", "1.5GiB" or "1000000" (binary
    units KiB..TiB, decimal K/KB..T/TB). Raises a one-line InputError naming `name`."""
    if isinstance(value, bool):
        raise InputError(f"{name} must be a size in bytes such as 4GiB or 512MiB, got {value!r}")
    if isinstance(value, int) or (hasattr(value, "__index__") and not isinstance(value, str)):
        n = int(value)
    else:
        m = _SIZE.fullmatch(str(value)) if isinstance(value, str) else None
        unit = _UNITS.get(m.group(2).lower()) if m else None
        if unit is None:
            raise InputError(f"{name} must be a size in bytes such as 4GiB, 512MiB or 1000000, got {value!r}")
        n = int(float(m.group(1)) * unit)
    if n <= 0:
        raise InputError(f"{name} must be a positive size, got {value!r}")
    return n


def format_size(n: int) -> str:
    """1536 -> "1.5 KiB" (binary units, as the sizes are parsed)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    raise AssertionError


def pool_budget(kv_cache_memory, memory_fraction: float, free: int | None, cpu: bool) -> tuple[int | None, bool]:
    """(bytes the KV pool may take, whether the user gave them), or (None, False) when nothing is known
    (no size given and the backend reports no free memory)."""
    if kv_cache_memory is not None:
        return parse_size(kv_cache_memory), True
    if not 0 < memory_fraction <= 1:
        raise InputError(f"memory_fraction must lie in (0, 1], got {memory_fraction!r}")
    if free is None:
        return (CPU_DEFAULT_BYTES if cpu else None), False
    budget = int(free * memory_fraction)
    return (min(budget, CPU_DEFAULT_BYTES) if cpu else budget), False
