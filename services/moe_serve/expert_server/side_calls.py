"""RunExperts over the side channel (rpc/side_channel.py): the connection's thread decodes the request, computes
and answers, under the bank's lock; no event loop and no worker hand-off on the way. Except for large calls
(MERGED_FROM_BYTES): the gateway splits those by rows over several connections, and their pieces, arriving
at once on as many threads, go to the merger (merger.py) to be computed as one, as gRPC calls are: each
expert once over all their rows instead of once a piece (on the 16-core host a 512-token layer took
114-130 ms over the side channel against 69-88 by gRPC when each piece was computed alone).

The request is the same RunExpertsRequest as over gRPC, parsed in place (zerocopy views into the frame just
read) and checked by the same `prepare`. From a same-host caller its hidden states and sums are in shared
memory, so a frame carries only the routing (~5 KB for 64 decode tokens at top-6); over TCP the frame
carries the tensors, and the reply's output goes out from the result's own buffer.
"""

from __future__ import annotations

import time
from functools import partial

from moe_client import zerocopy
from moe_client.wire import WireError
from moe_serve.expert_server.servicer import ExpertServicer
from moe_serve.rpc import request_ids
from moe_serve.rpc.errors import InvalidArgument, ServiceError
from moe_serve.rpc.output_tails import tailed
from moe_serve.rpc.side_channel import SideListener, Tailed

_REQUEST = zerocopy.RunExpertsRequest  # the zero-copy message type, as the gRPC handlers parse it
# Calls carrying this many bytes of hidden states or more (every piece of a call the gateway split over its
# lanes, at the default --tcp-min-piece-bytes) go through the merger; smaller ones (decode) compute here.
MERGED_FROM_BYTES = 1 << 20


class SideCalls:
    """Serves `servicer`'s RunExperts to same-host callers (abstract Unix socket) and, with `tcp=(host, port)`,
    to callers on other hosts; `address` and `tcp_port` go into GetInfo."""

    def __init__(self, servicer: ExpertServicer, token: str | None = None, max_bytes: int = 64 << 20,
                 unix: bool = True, tcp: tuple[str, int] | None = None):
        self.servicer = servicer
        self.unix = SideListener(self.handle, token, max_bytes) if unix else None
        self.tcp = SideListener(self.handle, token, max_bytes, tcp=tcp) if tcp is not None else None
        self.listeners = [listener for listener in (self.unix, self.tcp) if listener is not None]

    @property
    def address(self) -> str:
        """The Unix socket's name ("" when not offered)."""
        return self.unix.address if self.unix is not None else ""

    @property
    def tcp_port(self) -> int:
        return self.tcp.port if self.tcp is not None else 0

    @property
    def calls(self) -> int:
        """Calls answered over either socket (tests read it)."""
        return sum(listener.calls for listener in self.listeners)

    def handle(self, payload: memoryview) -> list | Tailed:
        start = time.perf_counter()
        code = "UNKNOWN"
        size = 0
        token = None
        try:
            try:
                request = _REQUEST.FromString(payload)
            except WireError as err:
                raise InvalidArgument(f"request of {len(payload)} bytes is not a RunExpertsRequest ({err})") from err
            token = request_ids.bind(request.request_id)
            reply, size = tailed(self._run(request))  # over TCP, the output may land in the caller's buffer
            code = "OK"
            return reply
        except ServiceError as err:
            code = err.code.name
            raise
        finally:
            self.servicer.metrics.record_call("RunExperts", code, time.perf_counter() - start, len(payload), size)
            if token is not None:
                request_ids.unbind(token)

    def _run(self, request):
        if request.hidden is not None and len(request.hidden.data) >= MERGED_FROM_BYTES:
            # A piece of a large call split over the gateway's lanes: computed with its sibling pieces (and any
            # other call of the layer queued meanwhile) as one, by the merger that gRPC calls go through.
            output, seconds, work = self.servicer.merger.run_blocking(partial(self.servicer.prepare, request))
        else:
            output, seconds, work = self._compute_here(request)
        self.servicer.observe(work, seconds)
        return zerocopy.RunExpertsResponse(output=output, compute_seconds=seconds,
                                           placement_version=self.servicer.info.placement_version,
                                           gpu_event=work.reply_event)

    def _compute_here(self, request):
        """On this thread, under the bank's lock: no hand-off to the merger's worker for a small call."""
        bank = self.servicer.bank
        queued = time.perf_counter()
        with bank.lock:
            self.servicer.metrics.queue_wait.observe(time.perf_counter() - queued)  # as the merger's queue
            work = self.servicer.prepare(request)
            start = time.perf_counter()
            out = bank.compute(work.layer, work.hidden, work.expert_ids, work.weights, work.out_dtype,
                               work.on_device)
            seconds = time.perf_counter() - start
            return work.finish(out), seconds, work

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()
