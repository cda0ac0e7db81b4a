"""Process memory: large buffers go straight back to the operating system when freed.

glibc serves allocations above a dynamic threshold with their own mapping, but raises that threshold (up to
32 MiB) each time such a block is freed; after that, weight-sized buffers come from the heap and stay resident
when freed. Loading a session frees many (ONNX Runtime reads each initializer, pre-packs it, drops the
original), so the resident set ends near twice the weights. Fixing the threshold at 64 KiB keeps every large
buffer its own mapping. Measured on GLM-Large (benchmarks/results/scale.md): int8-weight session peak 880 ->
708 MB, int4-weight 689 -> 564 MB, decode speed unchanged. A no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 64 * 1024
_done = False


def large_buffers_to_os() -> bool:
    """Once per process: mallopt(M_MMAP_THRESHOLD, 64 KiB). -> whether it took effect."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):
        _done = False
    return _done
