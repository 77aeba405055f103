"""The engine's CPU decode-attention kernel: `paged_decode.cc`, compiled on first use and called
through XLA's FFI.

On the CPU, XLA runs a decode step's attention over the paged cache as a gather of every row's
window bucket into fresh memory, then the products: at 8 rows over a 2048-token bucket that is most
of the step (docs/performance.md). The kernel reads each row's allowed keys where they lie in the
pools instead (`PagedView` calls it for one query per row when the engine runs on the CPU).

It is built with the system's C++ compiler ($CXX, else c++ / g++ / clang++) against the FFI
headers jaxlib ships, for this machine's CPU (-march=native), into kernels/ of the project's cache
($QVL_JAX_CACHE, else ~/.cache/qvl_jax), once per source, jaxlib version and CPU: the library is written under a temporary name and renamed, so a failed
or concurrent build leaves nothing half-written. Where no compiler works, `available()` says why
and the engine runs XLA's gather instead (the same tokens, slower); QVL_JAX_CPU_KERNEL=0 chooses that
too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import jax
import jax.numpy as jnp

from qvl_jax.files import cache_dir, temp_sibling

TARGET = "qvl_paged_decode"
_SOURCE = Path(__file__).with_name("paged_decode.cc")
_lock = threading.Lock()


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))


def _compiler() -> str | None:
    for name in [os.environ.get("CXX"), "c++", "g++", "clang++"]:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build() -> Path:
    """The compiled library's path (built now if the cache lacks it). Raises RuntimeError."""
    import jaxlib

    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC"]
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), jaxlib.__version__, _cpu_id(), cxx, *flags]).encode())
    out = cache_dir() / "kernels" / f"paged_decode-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    tmp = temp_sibling(out)  # compiled there, then renamed into place
    try:
        cmd = [cxx, *flags, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(tmp / out.name)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            lines = (run.stderr or run.stdout).strip().splitlines()
            why = next((ln for ln in lines if "error" in ln), lines[-1] if lines else f"exit {run.returncode}")
            raise RuntimeError(f"{Path(cxx).name} failed: {why.strip()}")
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@functools.cache
def _load() -> str | None:
    """Builds and registers the kernel once; None when it is ready, else why not (one line)."""
    if os.environ.get("QVL_JAX_CPU_KERNEL", "1") == "0":
        return "QVL_JAX_CPU_KERNEL=0"
    with _lock:
        try:
            lib = ctypes.cdll.LoadLibrary(str(_build()))
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.QvlPagedDecode), platform="cpu")
        except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as e:
            return f"{type(e).__name__}: {e}"
    return None


def unavailable_reason() -> str | None:
    """None if the kernel can run here (the CPU backend, built and registered); else why not."""
    if jax.default_backend() != "cpu":
        return f"the default backend is {jax.default_backend()}, not the CPU"
    return _load()


def available() -> bool:
    return unavailable_reason() is None


def why_not_for(attention: str, mesh, dtype) -> str | None:
    """Why an engine with this attention setting, mesh and model dtype cannot run its decode rows
    through the kernel; None if it can."""
    if attention != "xla":
        return f"attention={attention!r} has its own kernel"
    if mesh is not None:
        return "the model is sharded over a mesh"
    if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
        return f"the kernel takes float32 or bfloat16, not {jnp.dtype(dtype).name}"
    return unavailable_reason()


def paged_decode(q: jax.Array, kp: jax.Array, vp: jax.Array, table: jax.Array, mask: jax.Array,
                 block_size: int) -> jax.Array:
    """Attention of one query per row q [r, n, h] over pools kp, vp [slots, kv, h] (q's dtype,
    float32 or bfloat16) through table [r, blocks], keys where mask [r, window] (window <= blocks *
    block_size) holds. Returns [r, n, h]; zeros for a row with no allowed key. The pools are read as
    they are: a dtype other than q's is an error here, never a conversion of whole pools."""
    assert available(), unavailable_reason()
    if not kp.dtype == vp.dtype == q.dtype:
        raise TypeError(f"paged_decode: q is {q.dtype}, the pools {kp.dtype} / {vp.dtype}; they must match")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential")
    return call(q, kp, vp, table.astype(jnp.int32), mask.astype(bool), block_size=int(block_size))
