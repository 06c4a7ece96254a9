"""Keep a long-running server's memory bounded when it moves large messages.

glibc raises its mmap threshold each time a large block is freed, after which blocks of
a megabyte or more come from per-thread heaps that are rarely returned to the system; a
server passing 1 MiB messages through many threads then holds hundreds of megabytes it
no longer uses. Fixing the threshold makes such blocks mmap-backed and released on free.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3
LARGE_BLOCK_BYTES = 128 * 1024


def bound_large_allocations(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Pin glibc's mmap threshold; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
