"""gRPC transport shared by every moe-serve hop: channel options, and method bindings that carry
the tensor messages with the zero-copy codec (`moe_client.zerocopy`) on both ends."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from moe_client.security import TLSFiles, TokenInterceptor, channel_credentials
from moe_client.wire import WireError
from moe_client.zerocopy import TYPES, MessageType, serialize

MAX_MESSAGE_BYTES = 1 << 30  # 1 GiB: a 2,048-token x 7,168-hidden fp32 batch is 59 MB
# Measured on the 2-core machine (DESIGN.md): raising frame and buffer sizes doubles 1-8 MiB throughput.
TRANSPORT_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.max_frame_size", 16 * 1024 * 1024 - 1),
    ("grpc.http2.write_buffer_size", 64 * 1024 * 1024),
    ("grpc.http2.lookahead_bytes", 64 * 1024 * 1024),
]


def insecure_channel(address: str, extra: list[tuple[str, int | str]] | None = None) -> grpc.Channel:
    """A blocking channel to `address` (host:port or unix:path) with the shared options."""
    return grpc.insecure_channel(address, options=TRANSPORT_OPTIONS + list(extra or []))


def insecure_aio_channel(address: str, extra: list[tuple[str, int | str]] | None = None) -> grpc.aio.Channel:
    """An asyncio channel to `address` with the shared options."""
    return grpc.aio.insecure_channel(address, options=TRANSPORT_OPTIONS + list(extra or []))


def merge_options(base: list[tuple[str, int | str]], extra: list[tuple[str, int | str]] | None) -> list:
    """`base` with the keys of `extra` replaced by extra's values (grpc does not define which duplicate wins)."""
    extra = list(extra or [])
    keys = {k for k, _ in extra}
    return [(k, v) for k, v in base if k not in keys] + extra


def _secure_options(tls: TLSFiles, server_name: str | None, extra) -> tuple[list, grpc.ChannelCredentials]:
    options = merge_options(TRANSPORT_OPTIONS, extra)
    if server_name:  # certificates name the service (a DNS name) while we dial one of its addresses
        options.append(("grpc.ssl_target_name_override", server_name))
    return options, channel_credentials(tls)


def open_channel(address: str, tls: TLSFiles | None = None, token: str | None = None, extra=None,
                 server_name: str | None = None) -> grpc.Channel:
    """A blocking channel: TLS when `tls` is given, and a bearer token on every call when `token` is."""
    if tls is not None:
        options, creds = _secure_options(tls, server_name, extra)
        channel = grpc.secure_channel(address, creds, options=options)
    else:
        channel = grpc.insecure_channel(address, options=merge_options(TRANSPORT_OPTIONS, extra))
    if token:
        channel = grpc.intercept_channel(channel, TokenInterceptor(token))
    return channel


def open_aio_channel(address: str, tls: TLSFiles | None = None, extra=None,
                     server_name: str | None = None) -> grpc.aio.Channel:
    """An asyncio channel, TLS when `tls` is given (the gateway's channels to expert servers)."""
    if tls is not None:
        options, creds = _secure_options(tls, server_name, extra)
        return grpc.aio.secure_channel(address, creds, options=options)
    return grpc.aio.insecure_channel(address, options=merge_options(TRANSPORT_OPTIONS, extra))


def unary_callable(channel: grpc.Channel | grpc.aio.Channel, method: str, response_type: MessageType):
    """A unary-unary callable on `channel` ('/pkg.Service/Method') that sends either kind of message
    and reads the reply as `response_type` (tensor bytes as views into the received buffer)."""
    return channel.unary_unary(method, request_serializer=serialize, response_deserializer=response_type.FromString,
                               _registered_method=True)


class Malformed:
    """What a request that is not valid protobuf parses to; the handler answers INVALID_ARGUMENT."""

    def __init__(self, type_name: str, reason: str):
        self.reason = f"{type_name}: {reason}"


def _lenient(message_type: MessageType) -> Callable:
    def parse(data: bytes):
        try:
            return message_type.parse(data)
        except WireError as err:
            return Malformed(message_type.descriptor.name, str(err))
    return parse


def _guard(handler: Callable) -> Callable:
    async def guarded(request, context):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return await handler(request, context)
    return guarded


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(server: grpc.aio.Server, service: ServiceDescriptor, servicer) -> None:
    """Register an async servicer for every method of `service`, as the generated add_*_to_server does,
    but reading and writing the tensor-carrying messages with this module's types."""
    handlers = {}
    for method in service.methods:
        request = TYPES.get(method.input_type.full_name)
        kind = (method.client_streaming, method.server_streaming)
        behaviour = getattr(servicer, method.name)
        if request is not None and kind == (False, False):
            behaviour, deserialize = _guard(behaviour), _lenient(request)
        else:
            deserialize = GetMessageClass(method.input_type).FromString
        handlers[method.name] = _HANDLER_KINDS[kind](behaviour, request_deserializer=deserialize,
                                                     response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
