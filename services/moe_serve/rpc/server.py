"""Building blocks shared by both servers: an aio server with health, reflection, shared options,
TLS and the edge interceptor, a graceful stop, and one decorator that turns exceptions into status codes."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import _async as reflection_async
from grpc_reflection.v1alpha import reflection, reflection_pb2

from moe_client.channel import MAX_MESSAGE_BYTES, TRANSPORT_OPTIONS, merge_options
from moe_client.security import TLSFiles, read_pem
from moe_serve.rpc.edge import EdgeInterceptor
from moe_serve.rpc.errors import status_of
from moe_serve.rpc.options import ServingOptions

log = logging.getLogger(__name__)


def _status(name: str, err: Exception) -> tuple[grpc.StatusCode, str]:
    status = status_of(err)
    if status is None:
        log.exception("%s failed", name)
        return grpc.StatusCode.INTERNAL, f"{name}: {type(err).__name__}: {err}"
    log.info("%s: %s %s", name, status[0].name, status[1])
    return status


def rpc(handler: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    """Wrap an async servicer method: known errors keep their code, the rest become INTERNAL."""

    @functools.wraps(handler)
    async def wrapped(self, request, context: grpc.aio.ServicerContext):
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as err:  # the one place unexpected errors become INTERNAL
            await context.abort(*_status(handler.__name__, err))

    return wrapped


def rpc_stream(handler: Callable[..., AsyncIterator]) -> Callable[..., AsyncIterator]:
    """`rpc` for server-streaming methods (async generators)."""

    @functools.wraps(handler)
    async def wrapped(self, request, context: grpc.aio.ServicerContext):
        try:
            async for reply in handler(self, request, context):
                yield reply
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            await context.abort(*_status(handler.__name__, err))

    return wrapped


def server_credentials(tls: TLSFiles, require_client_cert: bool = False) -> grpc.ServerCredentials:
    """Server side: serve `tls.cert`; with `require_client_cert`, accept only clients signed by `tls.ca`."""
    if not tls.cert:
        raise ValueError("serving TLS needs a certificate and key (--tls-cert, --tls-key)")
    if require_client_cert and not tls.ca:
        raise ValueError("--require-client-cert needs --tls-ca, the CA that signs the clients' certificates")
    return grpc.ssl_server_credentials(
        [(read_pem(tls.key, "TLS key"), read_pem(tls.cert, "TLS certificate"))],
        root_certificates=read_pem(tls.ca, "TLS CA"),
        require_client_auth=require_client_cert,
    )


class _Health(health.aio.HealthServicer):
    """grpc's health servicer, whose Watch streams end cleanly when the server stops.

    Watch never returns by itself; a server stopping with a gateway watching cancelled it inside grpc's
    own task, which grpc logged as an unhandled CancelledError with two tracebacks after "Stopped.".
    `end_watches` makes every Watch return normally (the watcher has been told NOT_SERVING just before).
    """

    def __init__(self) -> None:
        super().__init__()
        self._ending = asyncio.Event()

    async def Watch(self, request, context) -> None:
        watch = asyncio.ensure_future(super().Watch(request, context))
        ending = asyncio.ensure_future(self._ending.wait())
        try:
            await asyncio.wait({watch, ending}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass
        finally:
            for task in (watch, ending):
                task.cancel()
            await asyncio.gather(watch, ending, return_exceptions=True)

    def end_watches(self) -> None:
        """End every Watch stream (after enter_graceful_shutdown has sent them NOT_SERVING)."""
        self._ending.set()


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def enable_reflection(names: list[str], server: grpc.aio.Server) -> None:
    """Server reflection as grpc.reflection.v1 (what grpcurl and current tools ask first) and v1alpha.

    grpcio-reflection serves only v1alpha; v1's messages are the same fields with the same numbers, so the
    one servicer answers both, registered under v1's name too.
    """
    listed = [*names, REFLECTION_V1, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(listed, server)
    servicer = reflection_async.ReflectionServicer(listed)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1,
                                                                          {"ServerReflectionInfo": handler}),))


class ServerHandle:
    """A started aio server with its bound port, health servicer and edge interceptor."""

    def __init__(self, server: grpc.aio.Server, port: int, health_servicer: health.aio.HealthServicer,
                 services: Iterable[str], edge: EdgeInterceptor | None = None):
        self.server = server
        self.port = port
        self.health = health_servicer
        self.services = list(services)
        self.edge = edge or EdgeInterceptor()
        self.on_stop: Callable[[], Awaitable] | None = None  # e.g. close outgoing channels

    async def set_serving(self, serving: bool) -> None:
        """Health of the whole server and each named service."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.services]:
            await self.health.set(name, status)

    async def stop(self, grace: float | None = 5.0) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish for up to `grace` seconds, then stop.

        Only calls the edge counts are waited for: health Watch streams never end by themselves, and
        grpc's own grace would wait for them to the last second.
        """
        await self.health.enter_graceful_shutdown()
        await self.edge.drain(grace)
        if isinstance(self.health, _Health):
            self.health.end_watches()
            await asyncio.sleep(0.05)  # the Watch handlers return and their streams close before the server stops
        await self.server.stop(0)
        if self.on_stop is not None:
            await self.on_stop()


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """The shared transport options, a message size limit, and room for the gateways' keepalive pings."""
    return merge_options(TRANSPORT_OPTIONS, [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Gateways ping every --keepalive seconds to notice a dead link; grpc's default would answer
        # pings more often than every 5 minutes with GOAWAY (too_many_pings).
        ("grpc.http2.min_ping_interval_without_data_ms", 200),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # grpc's default SO_REUSEPORT let a second server bind a port one already held, and the kernel then
        # split connections between them: a busy port must be an error.
        ("grpc.so_reuseport", 0),
    ])


async def start_server(
    address: str,
    register: Callable[[grpc.aio.Server], None],
    service_names: Iterable[str],
    serving: ServingOptions | None = None,
    limited: Iterable[str] = (),
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> ServerHandle:
    """Create, register, bind `address` (host:port, port 0 picks one, or unix:path) and start.

    `serving` gives TLS, token and limits; `limited` the full method names that count against max_queue;
    `interceptors` run inside those checks, on decoded requests (the metrics read each request's id).
    """
    serving = serving or ServingOptions()
    edge = EdgeInterceptor(serving.auth_token, serving.max_queue, limited)
    # 0 (derive from the model) is resolved by the services' mains; a bare server (an echo benchmark) keeps 1 GiB.
    limit = serving.max_message_bytes or MAX_MESSAGE_BYTES
    server = grpc.aio.server(interceptors=[edge, *interceptors], options=server_options(limit))
    register(server)
    health_servicer = _Health()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    enable_reflection([*names, health.SERVICE_NAME], server)
    if serving.tls is not None:
        port = server.add_secure_port(address, server_credentials(serving.tls, serving.require_client_cert))
    else:
        port = server.add_insecure_port(address)
    if port == 0 and not address.startswith("unix:"):
        raise OSError(f"could not bind {address}")
    await server.start()
    handle = ServerHandle(server, port, health_servicer, names, edge)
    await handle.set_serving(True)
    return handle


async def serve_until_signal(handle: ServerHandle, grace: float) -> None:
    """Run until SIGTERM or SIGINT; then NOT_SERVING, finish in-flight calls within `grace`, and return."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"Shutting down (finishing in-flight requests, up to {grace:.0f}s)...", flush=True)
    await handle.stop(grace)
    print("Stopped.", flush=True)
