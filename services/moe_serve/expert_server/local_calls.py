"""RunExperts over the same-host channel (rpc/local_channel.py): the connection's thread decodes the request,
computes and answers, under the bank's lock; no event loop and no worker hand-off on the way.

The request is the same RunExpertsRequest as over gRPC, checked by the same `prepare`; its hidden states
and sums are in shared memory, so a frame carries only the routing (~5 KB for 64 decode tokens at top-6).
"""

from __future__ import annotations

import time

from google.protobuf.message import DecodeError

from moe_client import zerocopy
from moe_client.pb import experts_pb2
from moe_serve.expert_server.servicer import ExpertServicer
from moe_serve.rpc import request_ids
from moe_serve.rpc.errors import InvalidArgument, ServiceError
from moe_serve.rpc.local_channel import LocalListener


class LocalCalls:
    """Serves `servicer`'s RunExperts to same-host callers; `address` goes into GetInfo."""

    def __init__(self, servicer: ExpertServicer, token: str | None = None, max_bytes: int = 64 << 20):
        self.servicer = servicer
        self.listener = LocalListener(self.handle, token, max_bytes)

    @property
    def address(self) -> str:
        return self.listener.address

    def handle(self, payload: bytearray) -> bytes:
        start = time.perf_counter()
        code = "UNKNOWN"
        reply = b""
        token = None
        try:
            try:
                request = experts_pb2.RunExpertsRequest.FromString(bytes(payload))
            except DecodeError as err:
                raise InvalidArgument(f"request of {len(payload)} bytes is not a RunExpertsRequest ({err})") from err
            token = request_ids.bind(request.request_id)
            reply = self._run(request)
            code = "OK"
            return reply
        except ServiceError as err:
            code = err.code.name
            raise
        finally:
            self.servicer.metrics.record_call("RunExperts", code, time.perf_counter() - start, len(payload),
                                              len(reply))
            if token is not None:
                request_ids.unbind(token)

    def _run(self, request) -> bytes:
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
        return zerocopy.RunExpertsResponse(output=output, compute_seconds=seconds).SerializeToString()

    def close(self) -> None:
        self.listener.close()
