"""glibc malloc tuning for processes that move large messages: keep freed big buffers for reuse.

Every RunExperts round trip allocates buffers the size of its tensors (grpc's slices, the message
bytes, the reply). Past glibc's mmap threshold each one is a fresh mmap: the kernel zeroes every
page on first touch and unmaps it on free, which doubled the CPU time of an 8 MiB echo on the
2-core machine (docs/benchmarks.md). Raising the mmap and trim thresholds keeps those buffers in
the heap to be reused; the price is that a process keeps its peak heap instead of returning it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def keep_large_buffers(max_reused_bytes: int = 256 << 20) -> bool:
    """Serve allocations up to `max_reused_bytes` from the heap and keep freed ones; False if not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    # Older glibc refuse thresholds above 32 MiB on 64-bit: fall back to that.
    for threshold in (max_reused_bytes, 32 << 20):
        if libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1:
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold)
            log.debug("malloc: buffers up to %d bytes kept for reuse", threshold)
            return True
    return False
