"""The C allocator's handling of large temporaries, for the steps that make many of them."""

from __future__ import annotations

import sys

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_applied = False


def reuse_large_allocations(limit: int = 1 << 30) -> bool:
    """Serve allocations up to `limit` bytes from the heap and keep freed heap memory for reuse (glibc only).

    onnxruntime's HQQ quantizer (torch) makes about a dozen weight-sized temporaries per iteration, 20
    iterations per weight. glibc serves every allocation above its mmap threshold (at most 32 MB when it
    adapts it) with fresh pages from the kernel and unmaps them on free, so each temporary is faulted in
    and zeroed anew: the kernel's share of the quantizer's time exceeded its arithmetic on a 1B model's
    weights. Heap-served temporaries are reused in place instead. The freed memory stays mapped (up to
    `limit` above what is in use), which holds the peak at about the largest temporaries of one weight.
    Process-wide and left in place; returns whether the allocator took it.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))
    return _applied
