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
import functools
import logging
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_large_buffers(max_reused_bytes: int = 256 << 20) -> bool:
    """Serve allocations up to `max_reused_bytes` from the heap and keep freed ones; False if not glibc."""
    libc = _libc()
    if libc is None:
        return False
    # Older glibc refuse thresholds above 32 MiB on 64-bit: fall back to that.
    # One arena: a buffer freed by one thread is reused by the next, whichever thread that is, and
    # release_free_memory can give it back. With glibc's arena per thread, each of grpc's threads kept
    # the peak of the messages it had read: 50 refused 18 MiB requests left a gateway 100+ MiB larger.
    libc.mallopt(_M_ARENA_MAX, 1)
    for threshold in (max_reused_bytes, 32 << 20):
        if libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1:
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold)
            log.debug("malloc: buffers up to %d bytes kept for reuse", threshold)
            return True
    return False


def release_free_memory() -> bool:
    """Return the heap's free pages to the system (glibc malloc_trim); False if not glibc.

    keep_large_buffers keeps freed buffers for the next call; a refused request's buffers should not
    stay: nothing will reuse them soon, and an attacker sending refused requests would pin memory.
    """
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
