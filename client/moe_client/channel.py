"""gRPC channels of every moe-serve hop: transport options, TLS and tokens, and method bindings that send
the tensor messages with the zero-copy codec (`moe_client.zerocopy`). Servers register theirs in
`moe_serve.rpc.registration`."""

from __future__ import annotations

import grpc

from moe_client.security import TLSFiles, TokenInterceptor, channel_credentials
from moe_client.zerocopy import MessageType, serialize

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
