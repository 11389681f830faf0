"""Transport: RunExperts-sized round trips (hidden [T, H] + ids and weights [T, K] out, [T, H] back).

Every variant sends the same tensors and gets the hidden states back, with no experts run. Ours
goes through the zero-copy codec on the gateway's own path (the calling thread hands the call to
the asyncio loop, as ExpertDispatcher.run does), over a unix socket and over TCP loopback; the
codec before zerocopy (upb messages) over TCP; torch RPC (TensorPipe) rpc_sync; and over TCP
alone (TensorPipe's transport between hosts); and a plain function call in-process. gRPC and torch
RPC run in alternating phases (see benchmarks.procs). Also measured: ours with a blocking channel
from the calling thread (no hand-off to the event loop), and split in two calls on two connections.
"""

from __future__ import annotations

import asyncio
from functools import partial

import numpy as np
import torch
import torch.distributed.rpc as rpc

from benchmarks import rpc_worker
from benchmarks.procs import WIDE_LANES, EchoPhase, RpcPhase
from benchmarks.timing import Samples, interleaved
from moe_client import wire, zerocopy
from moe_client.channel import unary_callable
from moe_client.pb import experts_pb2, tensor_pb2
from moe_client.striping import DEFAULT_LANES, MIN_PIECE_BYTES, Lanes, StripedReply, pieces
from moe_serve.gateway import side_dispatch
from moe_serve.rpc import side_lanes
from moe_serve.rpc.codec import from_wire, to_wire
from moe_serve.rpc.output_tails import answer
from moe_serve.rpc.side_channel import ChannelClosed
from tests.support.threads import LoopThread

UPB = experts_pb2.RunExpertsRequest.SerializeToString, experts_pb2.RunExpertsResponse.FromString


def side_echo(links: list, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
              min_piece_bytes: int = MIN_PIECE_BYTES, land: bool = True, per_lane: int = 1) -> list[tuple]:
    """A RunExperts-shaped echo over TCP side links (rpc/side_channel.py) through the gateway's own split, sends and
    waits (gateway/side_dispatch.py): one frame, or pieces of rows when the hidden states are 2 x `min_piece_bytes`
    (--tcp-min-piece-bytes) or more, up to `per_lane` a link (--tcp-pieces-per-lane), each link's sent and read in
    order, the links at once. (start, stop, output) per piece; with `land` (the gateway's way, when the server
    sends tail frames: rpc/frames.py) the outputs of a call of LAND_MIN_BYTES or more land side by side in one
    tensor of ours, returned as one piece."""
    request = zerocopy.RunExpertsRequest(layer=0, hidden=to_wire(hidden), expert_ids=to_wire(ids),
                                         weights=to_wire(weights))
    pieces = side_dispatch.split_call(request, links, min_piece_bytes, per_lane)
    # The echo answers in the hidden states' dtype, the one a request naming none gets; small replies are read whole
    landing = side_dispatch.landing_for(request, pieces, hidden.shape[1]) if land else None
    groups = side_dispatch.by_link(pieces)
    side_lanes.values(side_lanes.each([partial(side_dispatch.send_in_order, group, 120) for group in groups]))
    if failed := next((piece.send_error for piece in pieces if piece.send_error), ""):
        raise ChannelClosed(failed)
    dated = side_lanes.values(side_lanes.each([partial(side_dispatch.receive_in_order, group, 120)
                                               for group in groups]))
    replies = {id(piece): reply for group, got in zip(groups, dated, strict=True)
               for piece, (reply, _) in zip(group, got, strict=True)}
    if landing is not None and all(getattr(replies[id(piece)], "landed", False) for piece in pieces):
        return [(0, len(hidden), to_wire(landing))]
    return [(piece.start, piece.stop, answer(replies[id(piece)]).output) for piece in pieces]


def side_call(links: list, hidden: int, tokens: int, min_piece_bytes: int = MIN_PIECE_BYTES, per_lane: int = 1):
    """side_echo of `tokens` rows of fresh fp32 hidden states (payload's), as a function of no arguments."""
    x, ids, w = payload(hidden, 6, tokens, torch.float32)
    return lambda: side_echo(links, x, ids, w, min_piece_bytes, per_lane=per_lane)


def sizes(hidden: int, quick: bool, smoke: bool) -> list[tuple[int, torch.dtype]]:
    """(tokens, dtype) per row: 1 token in bf16 (4 KiB at hidden 2048), then fp32 from 1 token to 16 (full: 32) MiB."""
    if smoke:
        return [(1, torch.bfloat16), (8, torch.float32)]
    tokens = [1, 8, 128, 512, 1024, 2048] if quick else [1, 8, 64, 128, 256, 512, 1024, 2048, 4096]
    return [(1, torch.bfloat16)] + [(t, torch.float32) for t in tokens]


def payload(hidden: int, top_k: int, tokens: int, dtype: torch.dtype):
    """The request's tensors for one row: hidden [T, H], expert ids and gate weights [T, K]."""
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    ids = torch.randint(0, 64, (tokens, top_k), generator=gen, dtype=torch.int32)
    return x, ids, torch.rand(tokens, top_k, generator=gen)


async def _call(callable_, request):
    return await callable_(request, timeout=60)  # made and awaited on the loop, as aio calls must be


def grpc_variants(phase: EchoPhase, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> dict:
    """Ours over unix and TCP, and the upb codec over TCP, each returning the echoed hidden states."""
    loop = phase.loop.loop
    fast = {kind: unary_callable(phase.channels[kind], "/moe.bench.Echo/RunExperts", zerocopy.RunExpertsResponse)
            for kind in ("unix", "tcp")}
    upb_call = phase.channels["tcp"].unary_unary("/moe.bench.EchoUpb/RunExperts", request_serializer=UPB[0],
                                                 response_deserializer=UPB[1])
    storage = hidden.view(torch.int16) if hidden.dtype == torch.bfloat16 else hidden
    wire_dtype = {torch.float32: wire.FLOAT32, torch.bfloat16: wire.BFLOAT16}[hidden.dtype]

    def ours(kind: str) -> torch.Tensor:
        request = zerocopy.RunExpertsRequest(layer=0, hidden=to_wire(hidden), expert_ids=to_wire(ids),
                                             weights=to_wire(weights))
        reply = asyncio.run_coroutine_threadsafe(_call(fast[kind], request), loop).result()
        return from_wire(reply.output, "output")

    def upb() -> torch.Tensor:
        # As the codec was: arrays copied into messages, messages serialised and parsed by upb, fields copied out.
        request = experts_pb2.RunExpertsRequest(
            layer=0, hidden=tensor_pb2.Tensor(dtype=wire_dtype, shape=list(hidden.shape),
                                              data=storage.numpy().tobytes()),
            expert_ids=wire.encode(ids.numpy()), weights=wire.encode(weights.numpy()))
        reply = asyncio.run_coroutine_threadsafe(_call(upb_call, request), loop).result()
        raw = np.frombuffer(reply.output.data, storage.numpy().dtype).reshape(hidden.shape)
        return torch.from_numpy(raw.copy()).view(hidden.dtype)

    sync = unary_callable(phase.sync_channels["unix"], "/moe.bench.Echo/RunExperts", zerocopy.RunExpertsResponse)

    def ours_sync() -> torch.Tensor:
        request = zerocopy.RunExpertsRequest(layer=0, hidden=to_wire(hidden), expert_ids=to_wire(ids),
                                             weights=to_wire(weights))
        return from_wire(sync(request, timeout=60).output, "output")

    split = [unary_callable(c, "/moe.bench.Echo/RunExperts", zerocopy.RunExpertsResponse)
             for c in phase.split_channels]

    async def ours_split_async() -> torch.Tensor:
        parts = torch.tensor_split(torch.arange(len(hidden)), len(split))
        requests = [zerocopy.RunExpertsRequest(layer=0, hidden=to_wire(hidden[p]), expert_ids=to_wire(ids[p]),
                                               weights=to_wire(weights[p])) for p in parts]
        replies = await asyncio.gather(*(c(r, timeout=60) for c, r in zip(split, requests, strict=True)))
        return torch.cat([from_wire(r.output, "output") for r in replies])

    def ours_split() -> torch.Tensor:
        return asyncio.run_coroutine_threadsafe(ours_split_async(), loop).result()

    lanes = {n: Lanes(phase.lane_channels[:n], method="/moe.bench.Echo/RunExperts") for n in (2, DEFAULT_LANES)}
    out = torch.empty_like(hidden)
    out_rows = out.view(torch.int16).numpy() if hidden.dtype == torch.bfloat16 else out.numpy()

    def ours_lanes(n: int) -> torch.Tensor:
        # The gateway's path over TCP: large calls split by rows over n connections. The pieces are copied into
        # one tensor here (the gateway adds each into the layer's sum instead, as it does a whole reply), by
        # numpy: a torch copy would wake OpenMP's threads, whose spin-wait takes CPU from grpc's on 2 cores.
        request = zerocopy.RunExpertsRequest(layer=0, hidden=to_wire(hidden), expert_ids=to_wire(ids),
                                             weights=to_wire(weights))
        reply = asyncio.run_coroutine_threadsafe(_call(lanes[n], request), loop).result()
        if not isinstance(reply, StripedReply):
            return from_wire(reply.output, "output")
        for start, stop, output in pieces(reply, len(hidden)):
            out_rows[start:stop] = np.frombuffer(output.data, out_rows.dtype).reshape(stop - start, -1)
        return out

    def ours_side_tcp() -> torch.Tensor:
        # The gateway's path to another host's server: the TCP side channel from the calling thread, the
        # tensors sent from their own buffers and the reply read in place (gateway/side_dispatch.py).
        ((_, _, output),) = side_echo(phase.side_links[:1], hidden, ids, weights)
        return from_wire(output, "output")

    def ours_side_lanes(lanes: int, land: bool = True, per_lane: int = 1) -> torch.Tensor:
        # ... with calls of 2 MiB of hidden states or more split by rows over `lanes` of the server's links (as the
        # gateway does with --tcp-lanes), their outputs landing side by side in one tensor (tail frames); without
        # `land`, read from each piece's frame and copied into one tensor by numpy, as ours_lanes does;
        # `per_lane` pieces a link, each link's in order (--tcp-pieces-per-lane).
        replies = side_echo(phase.side_links[:lanes], hidden, ids, weights, land=land, per_lane=per_lane)
        if len(replies) == 1:
            return from_wire(replies[0][2], "output")
        for start, stop, output in replies:
            out_rows[start:stop] = np.frombuffer(output.data, out_rows.dtype).reshape(stop - start, -1)
        return out

    def raw_tcp() -> torch.Tensor:
        # The floor of one TCP connection from Python: the hidden states' bytes out and back in one frame each,
        # no message around them (the side channel's framing, sendmsg and recv_into alone).
        link = phase.raw_link
        back = link.receive(link.send(memoryview(storage.numpy()).cast("B")), 60)
        return torch.frombuffer(back, dtype=hidden.dtype).view(hidden.shape)

    return {"ours unix": lambda: ours("unix"), "ours tcp": lambda: ours("tcp"), "ours tcp side channel": ours_side_tcp,
            "ours tcp side lanes": lambda: ours_side_lanes(DEFAULT_LANES),
            "ours tcp side lanes, whole frames": lambda: ours_side_lanes(DEFAULT_LANES, land=False),
            "ours tcp side lanes, 2 pieces a lane": lambda: ours_side_lanes(DEFAULT_LANES, per_lane=2),
            f"ours tcp side {WIDE_LANES} lanes": lambda: ours_side_lanes(WIDE_LANES), "raw tcp frames (floor)": raw_tcp,
            "ours tcp lanes": lambda: ours_lanes(DEFAULT_LANES), "ours tcp 2 lanes": lambda: ours_lanes(2),
            "grpc+upb tcp (before)": upb,
            "ours unix sync": ours_sync, "ours unix split2": ours_split}


def _repeats(nbytes: int, quick: bool, smoke: bool) -> int:
    if smoke:
        return 3
    if nbytes <= 64 * 1024:
        return 150 if quick else 500
    return 15 if quick else 40


def run(loop: LoopThread, hidden_size: int, top_k: int, rounds: int, quick: bool = True,
        smoke: bool = False) -> list[dict]:
    """One row per payload size: timing summary per variant over all rounds, and bytes moved."""
    rows = sizes(hidden_size, quick, smoke)
    data = {row: payload(hidden_size, top_k, *row) for row in rows}
    samples = Samples()

    def measure(variants_of) -> None:
        for row in rows:
            x, ids, w = data[row]
            variants = {"in-process": lambda x=x, ids=ids, w=w: rpc_worker.echo(x, ids, w), **variants_of(x, ids, w)}
            for name, fn in variants.items():
                if not torch.equal(fn(), x):
                    raise AssertionError(f"transport variant {name} did not echo the hidden states")
            n = x.numel() * x.element_size()
            samples.add(row, interleaved(variants, _repeats(n, quick, smoke), warmup=2))

    for _ in range(rounds):
        with EchoPhase(loop) as phase:
            measure(lambda x, ids, w: grpc_variants(phase, x, ids, w))
        for name, tcp_only in (("torch RPC", False), ("torch RPC tcp-only", True)):
            with RpcPhase(workers=1, tcp_only=tcp_only) as group:
                measure(lambda x, ids, w, g=group, n=name: {n: lambda: rpc.rpc_sync(g.names[0], rpc_worker.echo,
                                                                                    args=(x, ids, w))})
    out = []
    for row in rows:
        x = data[row][0]
        n = x.numel() * x.element_size()
        out.append({"tokens": row[0], "dtype": str(row[1]).removeprefix("torch."), "payload_bytes": n,
                    "moved_bytes": 2 * n, "variants": samples.summaries(row)})
    return out
