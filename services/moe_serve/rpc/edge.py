"""What every call passes before a servicer sees it: token, admission, drain, decoding and deadline.

One server interceptor serves both services, so the same rules hold for every RPC, including RPCs
added later, and the servicers stay thin. Health and reflection pass untouched: probes must answer
even when the server is saturated or the caller has no token.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import inspect
import logging
import traceback
from collections.abc import Iterable

import grpc

from moe_client.security import AUTH_METADATA
from moe_serve.process.malloc import release_free_memory
from moe_serve.rpc.deadlines import REQUEST_DEADLINE, deadline_after

log = logging.getLogger(__name__)
RELEASE_BYTES = 4 << 20  # failed requests at least this large give their memory back at once (malloc_trim)
TRIM_DELAY = 0.05  # seconds
_trim_pending = False
EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def release_frames(err: BaseException) -> None:
    """Clear the locals of the finished frames `err` (and the exceptions it chains) passed through.

    A refused request's frames hold its message, and the exception's traceback holds the frames; grpc
    and asyncio keep exceptions in reference cycles, so without this a refused request's buffers (up
    to --max-message-bytes each) stayed until a garbage collection: three refused 684 MiB Forwards held
    2.4 GiB. The frame still running (the caller's) is left alone; it drops its own references.
    """
    pending, seen = [err], set()
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        pending += [exc.__cause__, exc.__context__]


def forget_refused(nbytes: int) -> None:
    """After a refused (or failed) request of `nbytes`: give a large one's freed buffers back to the system,
    once grpc has let go of the message too (it holds it until the status is sent): soon after, at most
    once per TRIM_DELAY however many fail meanwhile."""
    global _trim_pending
    if nbytes >= RELEASE_BYTES and not _trim_pending:
        _trim_pending = True
        asyncio.get_running_loop().call_later(TRIM_DELAY, _trim)


def _trim() -> None:
    global _trim_pending
    _trim_pending = False
    log.debug("returning freed memory after a failed request")
    gc.collect(1)  # grpc keeps an aborted call's state in a reference cycle (RPCState -> AbortError -> frames)
    release_free_memory()


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token, bounds in-flight work, tracks calls for a graceful drain, guards decoding.

    `limited` names the methods (e.g. "/moe.v1.ExpertService/RunExperts") that count against
    `max_inflight`; beyond it callers get RESOURCE_EXHAUSTED at once instead of queueing without bound.
    """

    def __init__(self, token: str | None = None, max_inflight: int | None = None, limited: Iterable[str] = ()):
        self.expected = f"Bearer {token}".encode() if token else None
        self.max_inflight = max_inflight
        self.limited = frozenset(limited)
        self.inflight = 0  # every non-exempt call being served
        self.admitted = 0  # of those, calls of `limited` methods
        self.served = 0  # calls admitted since start
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            inner = await continuation(handler_call_details)
            if inner is None or method.startswith(EXEMPT):
                return inner
            handler = self._handlers[method] = self._wrap(method, inner)
        return handler

    async def drain(self, timeout: float | None) -> bool:
        """Refuse new calls (UNAVAILABLE) and wait up to `timeout` s for in-flight ones; True if all finished."""
        self.draining = True
        if not timeout:
            return self.inflight == 0
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            log.warning("%d call(s) still in flight after %.1fs; cancelling them", self.inflight, timeout)
            return False

    def _authorized(self, context: grpc.aio.ServicerContext) -> bool:
        for key, value in context.invocation_metadata() or ():
            if key == AUTH_METADATA:
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self.expected)
        return False

    async def _admit(self, method: str, limited: bool, context: grpc.aio.ServicerContext) -> None:
        if self.expected is not None and not self._authorized(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{method}: missing or wrong bearer token (metadata '{AUTH_METADATA}: Bearer ...')")
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{method}: server is shutting down; try another")
        if limited and self.max_inflight is not None and self.admitted >= self.max_inflight:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{method}: {self.admitted} requests in flight, the limit is {self.max_inflight} "
                                "(--max-queue); retry later")
        self.inflight += 1
        self.admitted += limited
        self.served += 1
        self._idle.clear()

    def _release(self, limited: bool) -> None:
        self.inflight -= 1
        self.admitted -= limited
        if self.inflight == 0:
            self._idle.set()

    @staticmethod
    async def _decode(raw: bytes, deserialize, method: str, context: grpc.aio.ServicerContext):
        # grpc itself answers a message that does not parse with UNKNOWN ("Unexpected DecodeError"):
        # a malformed message is the caller's fault, and says so here.
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except Exception as err:  # any parser error is a bad request
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: request of {len(raw)} bytes is not "
                                f"a valid message ({type(err).__name__}: {err})")

    def _wrap(self, method: str, inner: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        limited = method in self.limited
        deserialize = inner.request_deserializer
        if inner.request_streaming:
            return inner  # no client-streaming RPCs in moe.v1
        if not inner.response_streaming and inspect.iscoroutinefunction(inner.unary_unary):
            behavior = inner.unary_unary

            async def unary(raw, context):
                size = len(raw)
                try:
                    await self._admit(method, limited, context)
                except BaseException:
                    raw = None  # a refused message is freed now (see release_frames)
                    forget_refused(size)
                    raise
                try:
                    request = await self._decode(raw, deserialize, method, context)
                    raw = None
                    REQUEST_DEADLINE.set(deadline_after(context.time_remaining()))
                    return await behavior(request, context)
                except BaseException as err:
                    raw = request = None
                    release_frames(err)
                    forget_refused(size)
                    raise
                finally:
                    self._release(limited)

            return grpc.unary_unary_rpc_method_handler(unary, response_serializer=inner.response_serializer)
        if inner.response_streaming and inner.unary_stream is not None:
            stream_behavior = inner.unary_stream

            async def stream(raw, context):
                size = len(raw)
                try:
                    await self._admit(method, limited, context)
                except BaseException:
                    raw = None
                    forget_refused(size)
                    raise
                try:
                    request = await self._decode(raw, deserialize, method, context)
                    raw = None
                    REQUEST_DEADLINE.set(deadline_after(context.time_remaining()))
                    result = stream_behavior(request, context)
                    request = None  # the handler holds it as long as it needs it
                    if inspect.isasyncgen(result):
                        async for item in result:
                            yield item
                    else:  # a handler that writes with context.write()
                        await result
                except BaseException as err:
                    raw = request = result = None
                    release_frames(err)
                    forget_refused(size)
                    raise
                finally:
                    self._release(limited)

            return grpc.unary_stream_rpc_method_handler(stream, response_serializer=inner.response_serializer)
        return inner
