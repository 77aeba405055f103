"""The engine's CPU kernels: `cpu_kernels.cc`, compiled on first use and called through XLA's FFI.

- `paged_decode`: on the CPU, XLA runs a decode step's attention over the paged cache as a gather of
  every row's window bucket into fresh memory, then the products: at 8 rows over a 2048-token
  bucket that is most of the step (docs/performance.md). The kernel reads each row's allowed keys
  where they lie in the pools instead (`PagedView` calls it for one query per row when the engine
  runs on the CPU).
- `paged_prefill`: the same for a prefill chunk's queries (`paged_prefill_packed`: for the chunks
  of several requests packed into one sequence, a mixed step's). XLA computes a chunk's scores over the
  whole window bucket and passes the [queries, window] float32 scores through memory several times
  (about 85 ms a layer for 448 queries over a 2048-key bucket at 2B widths, 2 cores); the kernel
  reads each block of queries' keys up to its last allowed one, in tiles: AMX tiles for bfloat16
  where the CPU has them (about 6 ms), VDPBF16PS vectors where it has AVX512_BF16 without AMX (AMD
  Zen 4 / 5: 512 queries over 1024 keys 22 -> 11.5 ms a layer), else float32 FMAs in registers
  (about 20 ms). `block_attention`
  runs the engine's vision blocks through it (each block of patches one table entry).
- `gemm_packed` (with `pack_weight`): a bfloat16 product x . w^T over a weight rearranged once into
  the tile unit's operand layout. On AMX: XLA's product bit for bit, 1.5x faster at a prompt
  chunk's rows, as fast as oneDNN's (`scripts/bench_products.py`). With AVX512_BF16 and no AMX
  (AMD Zen 4 / 5): the same layout read as VDPBF16PS operands, as fast as XLA's product at a
  prompt chunk's rows and 2-3x faster at a decode step's few rows (XLA's bfloat16 product of 1-8
  rows reads the weight at ~10 GB/s there). It runs the engine's decoder and lm_head products where
  the engine packs its weights (`qvl_jax.engine.packed`: by default where either unit runs it).
- `take_rows` / `put_rows`: rows of a table read, or written in place. XLA:CPU computes a bfloat16
  gather or scatter on a float32 copy of the whole operand: writing a step's tokens into a layer's
  pools, or looking up tokens in the embedding table inside a loop, then costs more than the step's
  arithmetic. These copy the rows' bytes (`PagedView` writes the pools with `put_rows`, the engine's
  steps look tokens up with `take_rows`, at every dtype, when the engine runs on the CPU).

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
import numpy as np

from qvl_jax.files import cache_dir, temp_sibling

# FFI target names -> the library's handler symbols.
TARGETS = {"qvl_paged_decode": "QvlPagedDecode", "qvl_paged_prefill": "QvlPagedPrefill",
           "qvl_paged_prefill_packed": "QvlPagedPrefillPacked", "qvl_take_rows": "QvlTakeRows",
           "qvl_put_rows": "QvlPutRows", "qvl_gemm_packed": "QvlGemmPacked"}
_SOURCE = Path(__file__).with_name("cpu_kernels.cc")
_lock = threading.Lock()
_lib: list = []  # the loaded library, once built


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
    out = cache_dir() / "kernels" / f"cpu_kernels-{key.hexdigest()[:16]}.so"
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
            for target, symbol in TARGETS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
            _lib.append(lib)
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
    """Why an engine with this attention setting, mesh and model dtype cannot run its decode rows,
    pool writes and token lookups through the kernels (`PagedCache.cpu`); None if it can."""
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
    return _attention("paged_decode", q, kp, vp, table, mask, block_size)


def paged_prefill(q: jax.Array, kp: jax.Array, vp: jax.Array, table: jax.Array, mask: jax.Array,
                  block_size: int) -> jax.Array:
    """Attention of t query tokens per row q [r, t, n, h] (a prefill chunk) over pools kp, vp [slots,
    kv, h] (q's dtype) through table [r, blocks], query i of row r seeing the keys where mask [r, t,
    window] holds; `paged_decode`'s arithmetic, computed only up to each block of queries' last
    allowed key. Returns [r, t, n, h]; zeros for a query with no allowed key."""
    return _attention("paged_prefill", q, kp, vp, table, mask, block_size)


def paged_prefill_packed(q: jax.Array, kp: jax.Array, vp: jax.Array, table: jax.Array, mask: jax.Array,
                         starts: jax.Array, block_size: int) -> jax.Array:
    """`paged_prefill` over the prompt chunks of several rows packed into one sequence (a mixed
    step's, `steps.mixed`): q [1, T, n, h]; row r of table [r, blocks] owns the query tokens
    [starts[r], starts[r + 1]) (starts [r + 1] int, ascending, at most T), each seeing the keys of
    its own row where its line of mask [1, T, window] holds. Returns [1, T, n, h]: each token's
    attention over its row's keys, zeros for a token with no allowed key or outside
    [starts[0], starts[r])."""
    return _attention("paged_prefill_packed", q, kp, vp, table, mask, block_size, starts.astype(jnp.int32))


def block_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """The vision tower's attention (`vision.block_attention`) through `paged_prefill`: q, k, v [B*S,
    n, h], each query attending to the keys of its own block of S where mask [B, S, S] holds (block
    b's keys read in place, as one table entry of S slots). Returns [B*S, n, h]; zeros for a query
    with no allowed key (a padding patch, where XLA's softmax averages every value instead)."""
    blocks, size = mask.shape[:2]
    table = jnp.arange(blocks, dtype=jnp.int32)[:, None]
    out = paged_prefill(q.reshape(blocks, size, *q.shape[1:]), k, v, table, mask, size)
    return out.reshape(q.shape)


def _attention(name: str, q, kp, vp, table, mask, block_size: int, *extra) -> jax.Array:
    """The call of the attention handler qvl_<name> (its output shaped as q)."""
    assert available(), unavailable_reason()
    if not kp.dtype == vp.dtype == q.dtype:
        raise TypeError(f"{name}: q is {q.dtype}, the pools {kp.dtype} / {vp.dtype}; they must match")
    call = jax.ffi.ffi_call(f"qvl_{name}", jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential")
    return call(q, kp, vp, table.astype(jnp.int32), mask.astype(bool), *extra, block_size=int(block_size))


def product_unit() -> str | None:
    """What runs `gemm_packed` here: "amx" (Intel's tile unit: XLA's own product bit for bit),
    "avx512_bf16" (VDPBF16PS vectors, AMD Zen 4 / 5 and others without AMX: the float32 sums in
    another order), or None (a plain float32 loop, far slower than XLA's product), as the CPU has
    them and the compiler targeted them."""
    if unavailable_reason() is not None:
        return None
    return {1: "amx", 2: "avx512_bf16"}.get(int(_lib[0].QvlProductUnit()))


def tile_products() -> bool:
    """Whether `gemm_packed` runs on the tile unit (AMX), where it is XLA's product bit for bit."""
    return product_unit() == "amx"


def pack_weight(w: jax.Array) -> jax.Array:
    """A bfloat16 weight w [n, k] (n and k multiples of 32) rearranged as `gemm_packed` reads it:
    [n/32, k/32, 2, 16, 32], block (nb, kb, h) holding the pairs (w[j', 2i], w[j', 2i + 1]) of rows
    j' = nb*32 + h*16 + j and columns kb*32 + 2i at [i, 2j], [i, 2j + 1]: the same values, moved."""
    n, k = w.shape
    if w.dtype != jnp.bfloat16 or n % 32 or k % 32:
        raise ValueError(f"pack_weight: a bfloat16 [n, k] weight with n and k multiples of 32, not "
                         f"{w.dtype}{list(w.shape)}")
    blocks = w.reshape(n // 32, 2, 16, k // 32, 16, 2)  # [nb, h, j, kb, i, e]
    return blocks.transpose(0, 3, 1, 4, 2, 5).reshape(n // 32, k // 32, 2, 16, 32)


def gemm_packed(x: jax.Array, wp: jax.Array, out_dtype=jnp.bfloat16, skip=None) -> jax.Array:
    """x [..., k] times the packed weight wp (`pack_weight` of w [n, k]) transposed: [..., n], the
    float32 sums of each output as they are (out_dtype float32) or rounded once (bfloat16): XLA's
    bfloat16 product with a float32 accumulator, bit for bit on the CPU's tile unit (AMX), where it
    runs; with AVX512_BF16 vectors or a float32 loop elsewhere (the same sums in another order).
    skip: (lo, hi), int scalars (traced or not): rows [lo, hi) of x flattened to [m, k] are not
    computed and come out as zeros (the other rows' sums are the same either way). No gradient:
    inference only."""
    assert available(), unavailable_reason()
    *lead, k = x.shape
    n = wp.shape[0] * 32
    if x.dtype != jnp.bfloat16 or wp.dtype != jnp.bfloat16 or wp.shape[1] * 32 != k:
        raise TypeError(f"gemm_packed: x {x.dtype}{list(x.shape)} and a packed weight {wp.dtype}{list(wp.shape)} "
                        "(bfloat16, the same k)")
    m = int(np.prod(lead, dtype=np.int64))
    rows = jnp.zeros(2, jnp.int32) if skip is None else jnp.stack([jnp.asarray(b, jnp.int32) for b in skip])
    call = jax.ffi.ffi_call("qvl_gemm_packed", jax.ShapeDtypeStruct((m, n), out_dtype), vmap_method="sequential")
    return call(x.reshape(m, k), wp, rows).reshape(*lead, n)


def take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table [n, ...] at ids (any shape, int): [*ids.shape, ...], as `jnp.take(table, ids, axis=0)`
    for ids in [0, n) (another id gives a zero row). No gradient: inference only."""
    assert available(), unavailable_reason()
    flat = ids.reshape(-1).astype(jnp.int32)
    call = jax.ffi.ffi_call("qvl_take_rows", jax.ShapeDtypeStruct((flat.shape[0], *table.shape[1:]), table.dtype),
                            vmap_method="sequential")
    return call(table, flat).reshape(*ids.shape, *table.shape[1:])


def put_rows(table: jax.Array, at: jax.Array, rows: jax.Array) -> jax.Array:
    """`table.at[at].set(rows)` for at [m] (int) and rows [m, ...] in table's dtype, written in place
    where XLA can give the kernel table's buffer (table not read after this call); an index outside
    [0, n) is dropped, as XLA's scatter drops it."""
    assert available(), unavailable_reason()
    if rows.dtype != table.dtype or rows.shape != (at.shape[0], *table.shape[1:]):
        raise TypeError(f"put_rows: rows {rows.dtype}{list(rows.shape)} for a table {table.dtype}{list(table.shape)} "
                        f"at {at.shape[0]} indices")
    call = jax.ffi.ffi_call("qvl_put_rows", jax.ShapeDtypeStruct(table.shape, table.dtype),
                            input_output_aliases={0: 0}, vmap_method="sequential")
    return call(table, at.astype(jnp.int32), rows)
