"""Large temporaries inside `reuse_large_allocations` come from the heap (reused), outside from fresh mappings."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edgepack.core.allocator import reuse_large_allocations

SIZE = 64 << 20  # above glibc's largest adaptive mmap threshold (32 MB)


def _in_heap(array: np.ndarray) -> bool:
    address = array.__array_interface__["data"][0]
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith("[heap]"):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            return start <= address < end
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc/self/maps: Linux only")
def test_large_temporaries_come_from_the_heap_inside_only():
    assert not _in_heap(np.empty(SIZE, dtype=np.uint8))  # glibc maps it fresh and unmaps it on free
    with reuse_large_allocations() as applied:
        assert applied
        assert _in_heap(np.empty(SIZE, dtype=np.uint8))
    assert not _in_heap(np.empty(SIZE, dtype=np.uint8))  # glibc's thresholds are back
