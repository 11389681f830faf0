"""Building blocks shared by both servers: an aio server with health, reflection, shared options,
and one decorator that turns exceptions into status codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moe_client.channel import TRANSPORT_OPTIONS
from moe_serve.errors import status_of

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


class ServerHandle:
    """A started aio server with its bound port and health servicer."""

    def __init__(self, server: grpc.aio.Server, port: int, health_servicer: health.aio.HealthServicer,
                 services: Iterable[str]):
        self.server = server
        self.port = port
        self.health = health_servicer
        self.services = list(services)
        self.on_stop: Callable[[], Awaitable] | None = None  # e.g. close outgoing channels

    async def set_serving(self, serving: bool) -> None:
        """Health of the whole server and each named service."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.services]:
            await self.health.set(name, status)

    async def stop(self, grace: float | None = 5.0) -> None:
        """NOT_SERVING, then let in-flight calls finish for up to `grace` seconds."""
        await self.set_serving(False)
        await self.server.stop(grace)
        if self.on_stop is not None:
            await self.on_stop()


async def start_server(
    address: str,
    register: Callable[[grpc.aio.Server], None],
    service_names: Iterable[str],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> ServerHandle:
    """Create, register, bind `address` (host:port, port 0 picks one, or unix:path) and start."""
    server = grpc.aio.server(options=TRANSPORT_OPTIONS, interceptors=list(interceptors))
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(address)
    if port == 0 and not address.startswith("unix:"):
        raise OSError(f"could not bind {address}")
    await server.start()
    handle = ServerHandle(server, port, health_servicer, names)
    await handle.set_serving(True)
    return handle
