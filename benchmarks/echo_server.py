"""A gRPC server answering RunExperts-shaped echoes: the transport's share of a RunExperts call.

`/moe.bench.Echo/RunExperts` reads the request as the expert server does (zero-copy views) and
sends the hidden states back as the output; `/moe.bench.EchoUpb/RunExperts` does the same with the
codec as it was before zerocopy (upb messages, bytes copied out of and into them). The same echo
answers on a TCP side channel too (rpc/side_channel.py: frames, no gRPC), as an expert server's
does. Binds a TCP port (--host), a unix socket and the side channel's TCP port, prints
{"tcp": ..., "unix": ..., "side_tcp": ..., "raw_tcp": ...} on one line, serves until SIGTERM. `raw_tcp` is
the side channel echoing a frame's bytes as they are, no message: the floor of one TCP connection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import grpc
import numpy as np

from moe_client import zerocopy
from moe_client.pb import experts_pb2, tensor_pb2
from moe_serve.process.malloc import keep_large_buffers
from moe_serve.rpc.codec import from_wire, to_wire
from moe_serve.rpc.output_tails import tailed
from moe_serve.rpc.server import start_server
from moe_serve.rpc.side_channel import SideListener, Tailed


async def echo(request, context):
    """Decode like RunExperts, answer the hidden states as the output."""
    hidden = from_wire(request.hidden, "hidden")
    from_wire(request.expert_ids, "expert_ids")
    from_wire(request.weights, "weights")
    return zerocopy.RunExpertsResponse(output=to_wire(hidden))


async def echo_upb(request, context):
    """The same with the codec before zerocopy: field access copies, the reply tensor copied into a message."""
    hidden = np.frombuffer(request.hidden.data, np.uint8)
    _ = request.expert_ids.data, request.weights.data
    return experts_pb2.RunExpertsResponse(output=tensor_pb2.Tensor(dtype=request.hidden.dtype,
                                                                   shape=request.hidden.shape, data=hidden.tobytes()))


def echo_frame(payload: memoryview) -> list | Tailed:
    """The side channel's echo: the request parsed in place and answered, as an expert server's side_calls does."""
    request = zerocopy.RunExpertsRequest.FromString(payload)
    hidden = from_wire(request.hidden, "hidden")
    from_wire(request.expert_ids, "expert_ids")
    from_wire(request.weights, "weights")
    return tailed(zerocopy.RunExpertsResponse(output=to_wire(hidden)))[0]


def register(server: grpc.aio.Server) -> None:
    """Both echo services on `server`."""
    fast = grpc.unary_unary_rpc_method_handler(echo, request_deserializer=zerocopy.RunExpertsRequest.FromString,
                                               response_serializer=zerocopy.serialize)
    upb = grpc.unary_unary_rpc_method_handler(echo_upb,
                                              request_deserializer=experts_pb2.RunExpertsRequest.FromString,
                                              response_serializer=experts_pb2.RunExpertsResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("moe.bench.Echo", {"RunExperts": fast}),
                                     grpc.method_handlers_generic_handler("moe.bench.EchoUpb", {"RunExperts": upb})))


async def serve(unix: str, tcp: str = "127.0.0.1:0", side_port: int = 0) -> None:
    """Serve on `tcp` (host:port, port 0 picks one), `unix` and the side channel's TCP port until SIGTERM."""
    handles = [await start_server(address, register, []) for address in (tcp, unix)]
    host = tcp.rsplit(":", 1)[0]
    side = SideListener(echo_frame, max_bytes=1 << 30, tcp=(host, side_port))
    raw = SideListener(lambda payload: payload, max_bytes=1 << 30, tcp=(host, 0))  # the bytes alone: the floor
    print(json.dumps({"tcp": f"{host}:{handles[0].port}", "unix": unix, "side_tcp": side.address,
                      "raw_tcp": raw.address}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    side.close()
    raw.close()
    for handle in handles:
        await handle.stop(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--unix", required=True, help="unix:/path to bind besides a TCP port")
    parser.add_argument("--host", default="127.0.0.1:0", help="host:port of the TCP listener (port 0 picks one)")
    parser.add_argument("--side-port", type=int, default=0, help="TCP port of the side channel (0 picks one)")
    parser.add_argument("--malloc-default", action="store_true", help="leave glibc malloc's thresholds alone")
    args = parser.parse_args()
    if not args.malloc_default:
        keep_large_buffers()  # as the expert servers do
    asyncio.run(serve(args.unix, args.host, args.side_port))
