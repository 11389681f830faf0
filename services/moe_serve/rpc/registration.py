"""Registering a servicer so that the tensor-carrying messages are read and written with the zero-copy codec.

The generated add_*_to_server would parse requests with protobuf's own classes (copying every tensor's
bytes); these handlers parse them as `moe_client.zerocopy` types, and a request that is not valid
protobuf reaches no handler: it is answered INVALID_ARGUMENT with what was wrong.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from moe_client.wire import WireError
from moe_client.zerocopy import TYPES, MessageType, serialize


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
