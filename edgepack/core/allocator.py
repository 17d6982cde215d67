"""The C allocator's handling of large temporaries, for the steps that make many of them."""

from __future__ import annotations

import contextlib
import sys

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_GLIBC_DEFAULT = 128 * 1024  # both thresholds' initial values


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # not glibc (musl has neither)
        return None
    return libc


@contextlib.contextmanager
def reuse_large_allocations(limit: int = 1 << 30):
    """Inside: allocations up to `limit` bytes come from the heap and freed heap memory is kept for reuse (glibc).

    onnxruntime's HQQ quantizer (torch) makes about a dozen weight-sized temporaries per iteration, 20
    iterations per weight. glibc serves every allocation above its mmap threshold (at most 32 MB when it
    adapts it) with fresh pages from the kernel and unmaps them on free, so each temporary is faulted in
    and zeroed anew, kernel time that grows with every weight and iteration. Heap-served temporaries are
    reused in place instead. On exit the thresholds go back to
    glibc's initial values and the freed memory is returned (`malloc_trim`), so later steps of the same
    process do not keep it. Elsewhere than glibc, a no-op.
    """
    libc = _libc()
    applied = libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, limit))
    try:
        yield applied
    finally:
        if applied:
            libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
            libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)
            libc.malloc_trim(0)


def return_freed_memory() -> None:
    """Give heap pages freed by finished work back to the system (glibc's `malloc_trim`; elsewhere nothing).

    onnxruntime sessions and onnx models are freed when a build step ends, but glibc keeps much of that
    memory in its heap for reuse, and the next step's peak then sits on top of it.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
