"""The floor under our TCP path: raw-bytes gRPC echoes (no protobuf, no codec) over 1-8 connections with
HTTP/2 option sets, beside torch RPC (TensorPipe) restricted to TCP, on loopback.

    python benchmarks/grpc_floor.py            # self-contained: grpcio and torch only, so it runs on any host

This is what docs/deployment-sizing.md's profile table was measured with (on a quiet 16-core host):
if a raw-bytes echo is no faster than ours, no codec change can close the gap. Prints, per option set
and connection count, the median round trip of 30 and (request + reply bytes) / time.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time

import grpc

SIZES = [4096, 1 << 20, 4 << 20, 8 << 20, 16 << 20, 32 << 20]
M = 1 << 30
TUNED = [("grpc.max_send_message_length", M), ("grpc.max_receive_message_length", M),
         ("grpc.http2.max_frame_size", (1 << 24) - 1), ("grpc.http2.write_buffer_size", 1 << 26),
         ("grpc.http2.lookahead_bytes", 1 << 26)]  # as moe_client.channel.TRANSPORT_OPTIONS
OPTIONS = {"tuned": TUNED, "tuned, no BDP probe": [*TUNED, ("grpc.http2.bdp_probe", 0)], "defaults": TUNED[:2]}


async def _serve(name: str) -> None:
    server = grpc.aio.server(options=OPTIONS[name])

    async def echo(request, context):
        return request

    handler = grpc.unary_unary_rpc_method_handler(echo)  # no serializers: bytes in, bytes out
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("E", {"E": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def _client(port: int, name: str, connections: int, repeats: int) -> dict[int, float]:
    calls = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[*OPTIONS[name],
                                                                     ("grpc.use_local_subchannel_pool", 1)])
             .unary_unary("/E/E") for _ in range(connections)]
    out = {}
    for size in SIZES:
        data = os.urandom(size)
        parts = [data[i * size // connections:(i + 1) * size // connections] for i in range(connections)]

        async def once(parts=parts):
            await asyncio.gather(*(call(part) for call, part in zip(calls, parts, strict=True)))

        for _ in range(3):
            await once()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            await once()
            times.append(time.perf_counter() - start)
        out[size] = statistics.median(times)
    return out


def _line(label: str, results: dict[int, float]) -> str:
    return f"{label:>32} " + " ".join(f"{s >> 10}K {t * 1e3:.2f} ms {2 * s / t / 1e9:.2f} GB/s |"
                                      for s, t in results.items())


def _torch_rpc(rank: int, repeats: int) -> None:
    import torch
    import torch.distributed.rpc as rpc

    options = rpc.TensorPipeRpcBackendOptions(init_method="tcp://127.0.0.1:29511", _transports=["uv"],
                                              _channels=["basic"], num_worker_threads=8)
    rpc.init_rpc(f"w{rank}", rank=rank, world_size=2, rpc_backend_options=options)
    if rank == 0:
        results = {}
        for size in SIZES:
            x = torch.randint(0, 255, (size,), dtype=torch.uint8)
            for _ in range(3):
                rpc.rpc_sync("w1", _echo, args=(x,))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                rpc.rpc_sync("w1", _echo, args=(x,))
                times.append(time.perf_counter() - start)
            results[size] = statistics.median(times)
        print(_line("torch RPC, TCP only", results), flush=True)
    rpc.shutdown()


def _echo(x):
    return x


def main() -> None:
    """Every option set x 1, 2, 4, 8 connections, then torch RPC restricted to TCP."""
    if len(sys.argv) > 2 and sys.argv[1] == "serve":
        asyncio.run(_serve(sys.argv[2]))
        return
    for name in OPTIONS:
        for connections in (1, 2, 4, 8):
            server = subprocess.Popen([sys.executable, __file__, "serve", name], stdout=subprocess.PIPE)
            try:
                port = int(server.stdout.readline())
                print(_line(f"{name}, {connections} conn", asyncio.run(_client(port, name, connections, 30))),
                      flush=True)
            finally:
                server.terminate()
                server.wait()
    import torch.multiprocessing as mp

    mp.spawn(_torch_rpc, args=(30,), nprocs=2)


if __name__ == "__main__":
    main()
