"""Stream memory operations: a GPU stream waits for a word in GPU memory that another process's stream sets.

A CUDA event orders two processes' work only once it has been recorded: a stream that waits on an
event the peer has not recorded yet does not wait at all. So with events alone a caller must hear
from the server (the reply naming its recorded event) before its stream may wait for the server's
output, and its host waits one round trip a layer. A word does not have that limit: the server's
stream sets it once the output is written (cuStreamWriteValue32, which fences the writes before it),
and the caller's stream can be told to wait for it (cuStreamWaitValue32) before the server has even
read the request. The caller's host goes on to the next layer at once (gateway/pipelined_calls.py).

CUDA's driver API, through ctypes: torch does not expose these calls. `available` tries them once per
device; where they are missing or refused, callers keep to events.
"""

from __future__ import annotations

import ctypes
import threading
from functools import cache

import torch

WAIT_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ: wait until (int32)(*addr - value) >= 0
WRITE_DEFAULT = 0x0  # CU_STREAM_WRITE_VALUE_DEFAULT: fences the stream's earlier writes before the write
_lock = threading.Lock()


class SignalError(RuntimeError):
    """The driver refused a stream memory operation."""


@cache
def _calls() -> tuple | None:
    """(wait, write) from libcuda, the _v2 entry points first (the unversioned ones are CUDA 11's); None
    without a driver."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    found = []
    for base in ("cuStreamWaitValue32", "cuStreamWriteValue32"):
        fn = getattr(lib, f"{base}_v2", None) or getattr(lib, base, None)
        if fn is None:
            return None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        fn.restype = ctypes.c_int
        found.append(fn)
    return tuple(found)


def _check(result: int, what: str) -> None:
    if result != 0:
        raise SignalError(f"{what}: CUDA driver error {result}")


def wait_at_least(stream: torch.cuda.Stream, address: int, value: int) -> None:
    """`stream` waits (on the GPU; the host goes on) until the uint32 at device `address` reaches `value`
    (compared modulo 2**32, as CUDA's GEQ compares: callers keep values within 2**31 of each other)."""
    _check(_calls()[0](stream.cuda_stream, address, value & 0xFFFFFFFF, WAIT_GEQ), "cuStreamWaitValue32")


def write(stream: torch.cuda.Stream, address: int, value: int) -> None:
    """`stream` sets the uint32 at device `address` to `value` once its earlier work is done."""
    _check(_calls()[1](stream.cuda_stream, address, value & 0xFFFFFFFF, WRITE_DEFAULT), "cuStreamWriteValue32")


@cache
def available(device: torch.device) -> bool:
    """Whether streams on `device` take these operations: a write and a wait on a fresh word, checked."""
    if device.type != "cuda" or _calls() is None:
        return False
    with _lock, torch.cuda.device(device):
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):  # all on one stream: a zero fill queued elsewhere could land after the 7
            word = torch.zeros(1, dtype=torch.int32, device=device)
            try:
                write(stream, word.data_ptr(), 7)
                wait_at_least(stream, word.data_ptr(), 7)  # set just before on this stream: returns at once
            except SignalError:
                return False
            stream.synchronize()
            return int(word.item()) == 7
