"""RunExperts over the side channel (rpc/side_channel.py): the connection's thread decodes the request, computes
and answers, under the bank's lock; no event loop and no worker hand-off on the way.

The request is the same RunExpertsRequest as over gRPC, parsed in place (zerocopy views into the frame just
read) and checked by the same `prepare`. From a same-host caller its hidden states and sums are in shared
memory, so a frame carries only the routing (~5 KB for 64 decode tokens at top-6); over TCP the frame
carries the tensors, and the reply's output goes out from the result's own buffer.
"""

from __future__ import annotations

import time

from moe_client import zerocopy
from moe_client.wire import WireError
from moe_serve.expert_server.servicer import ExpertServicer
from moe_serve.rpc import request_ids
from moe_serve.rpc.errors import InvalidArgument, ServiceError
from moe_serve.rpc.output_tails import tailed
from moe_serve.rpc.side_channel import SideListener, Tailed

_REQUEST = zerocopy.RunExpertsRequest  # the zero-copy message type, as the gRPC handlers parse it


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
        bank = self.servicer.bank
        queued = time.perf_counter()
        with bank.lock:
            self.servicer.metrics.queue_wait.observe(time.perf_counter() - queued)  # as the merger's queue
            work = self.servicer.prepare(request)
            start = time.perf_counter()
            out = bank.compute(work.layer, work.hidden, work.expert_ids, work.weights, work.out_dtype,
                               work.on_device)
            seconds = time.perf_counter() - start
            output = work.finish(out)
        self.servicer.observe(work, seconds)
        return zerocopy.RunExpertsResponse(output=output, compute_seconds=seconds,
                                           placement_version=self.servicer.info.placement_version,
                                           gpu_event=work.reply_event)

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()
