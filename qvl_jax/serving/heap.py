"""Giving the memory of a large request body back to the system once the request is over.

glibc's malloc keeps freed memory in its arenas for reuse: after a 60 MB body (received in 64 KiB
pieces, joined, parsed) was refused, the server stayed hundreds of MB larger than before.
`malloc_trim(0)` returns the free pages of every arena. Elsewhere (another libc) it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

LARGE_BODY_BYTES = 8 << 20  # bodies at least this large are followed by a trim


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def give_back() -> None:
    """Frees what only reference cycles still hold (a refused request's traceback keeps its frames and
    their locals), then returns the heap's free pages to the system."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)
