"""CUDA IPC events: how two processes order their work on one GPU without either waiting for it.

A device-routed call (gateway/side_dispatch.py, expert_server/servicer.py) leaves its tensors on the GPU.
The caller records its event after writing them and sends the event's handle instead of synchronising;
the server's stream waits on it, computes, records the server's own event after writing the sums and
replies at once, naming that event; the caller's stream waits on it before reading the sums. Neither
host waits for the GPU, so the host runs ahead and the GPU never idles between a layer's stages.

A stream waits for the work recorded before the wait was issued (cudaStreamWaitEvent), and each side
issues its wait before the other can record again for a later call, so one event per stream is
enough: a later record on the same stream covers more work, never less. (Per stream, not per device:
two micro-batches may stage on two streams, and a record on one says nothing about the other.)
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcEventHandle_t)
_STREAMS: dict[tuple, torch.cuda.Stream] = {}  # by torch's (stream id, device index, device type)


def current_stream(device: torch.device) -> torch.cuda.Stream:
    """torch.cuda.current_stream(device) without making a new Stream each time (~10 us of Python on a busy
    host, several times per expert call): one object per stream, found by torch's id of it."""
    torch.cuda._lazy_init()  # returns at once once CUDA is up
    key = torch._C._cuda_getCurrentStream(device.index if device.index is not None else torch.cuda.current_device())
    stream = _STREAMS.get(key)
    if stream is None:
        if len(_STREAMS) >= 256:
            _STREAMS.clear()
        stream = _STREAMS[key] = torch.cuda.current_stream(device)
    return stream


def ipc_event(stream: torch.cuda.Stream) -> tuple[torch.cuda.Event, bytes]:
    """A new interprocess event, first recorded on `stream` (so made on its device), and its IPC handle."""
    with torch.cuda.device(stream.device):
        event = torch.cuda.Event(interprocess=True)
        event.record(stream)
        return event, bytes(event.ipc_handle())


class GpuEvents:
    """This process's own interprocess event per stream, and the peers' events it has opened."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        # By stream: (device index, cudaStream_t); the legacy default stream is 0 on every device.
        self._own: dict[tuple[int, int], tuple[torch.cuda.Event, bytes]] = {}
        self._opened: OrderedDict[tuple[torch.device, bytes], torch.cuda.Event] = OrderedDict()
        self._lock = threading.Lock()

    def handle(self, device: torch.device) -> bytes:
        """The IPC handle of our event for `device`'s current stream (made on first use), for the peer."""
        return self._event(current_stream(device))[1]

    def record(self, device: torch.device) -> bytes:
        """Record our event on `device`'s current stream; its IPC handle."""
        stream = current_stream(device)
        event, handle = self._event(stream)
        event.record(stream)
        return handle

    def _event(self, stream: torch.cuda.Stream) -> tuple[torch.cuda.Event, bytes]:
        key = (stream.device_index, stream.cuda_stream)
        with self._lock:
            own = self._own.get(key)
            if own is None:
                own = self._own[key] = ipc_event(stream)
        return own

    def wait(self, device: torch.device, handle: bytes) -> None:
        """Make `device`'s current stream wait for the peer's event `handle` (opened once, kept)."""
        key = (device, bytes(handle))
        with self._lock:
            event = self._opened.get(key)
            if event is None:
                event = self._opened[key] = torch.cuda.Event.from_ipc_handle(device, key[1])
                while len(self._opened) > self.limit:
                    self._opened.popitem(last=False)
            else:
                self._opened.move_to_end(key)
        current_stream(device).wait_event(event)
