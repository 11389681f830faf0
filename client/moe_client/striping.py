"""A large RunExperts call split by token rows over several connections to one server, run concurrently.

Why: one gRPC call moves its bytes through one HTTP/2 stream of one TCP connection, and grpc handles
a connection's frames, flow-control updates and reads one after another; two to four connections
in flight at once keep the link (and, on loopback, both ends' cores) busy where one call leaves
gaps (docs/deployment-sizing.md has the measurements).

Why rows: a RunExperts call's rows are independent (a token's partial sum depends on its own row, ids
and weights only), so each piece is a complete, ordinary RunExperts request that any server answers
as it would the whole; nothing is reassembled on the server, and the caller adds each piece's rows
into the layer's sum where it would have added the whole call's (gateway/dispatch.py, `pieces`): no
copy is made to put the pieces back together. The pieces slice the request's tensor bytes (views, no
copy) and succeed or fail together: one failing cancels the others and the whole call fails, so the
caller's failover sees one call.

Legend: T = tokens (rows) of the call, H = hidden size, K = top-k, N = pieces.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import grpc

from moe_client import zerocopy
from moe_client.wire import FLOAT8_E4M3, WireTensor

RUN_EXPERTS = "/moe.v1.ExpertService/RunExperts"
DEFAULT_LANES = 4
# Below a piece of this many hidden-state bytes the extra call's fixed cost (~0.5 ms here) outweighs
# what the overlap saves (measured: splitting helps from 2 MiB a call, not at 1 MiB).
MIN_PIECE_BYTES = 1 << 20
LANE_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # a channel of its own subchannel pool: its own connection


class StripedReply(NamedTuple):
    """The replies of one call's pieces: (first row, end row, RunExpertsResponse) each, in row order."""

    pieces: tuple[tuple[int, int, object], ...]

    @property
    def compute_seconds(self) -> float:
        return max(reply.compute_seconds for _, _, reply in self.pieces)

    @property
    def placement_version(self) -> int:
        """The server's placement version, the newest any piece carried."""
        return max(reply.placement_version for _, _, reply in self.pieces)

    def ByteSize(self) -> int:
        """Bytes received over all pieces (for the call metrics)."""
        return sum(reply.ByteSize() for _, _, reply in self.pieces)


def pieces(reply, rows: int) -> Iterator[tuple[int, int, WireTensor]]:
    """(first row, end row, output [rows, H]) of each piece of `reply`, a plain or a striped one of `rows` rows."""
    if isinstance(reply, StripedReply):
        for start, stop, part in reply.pieces:
            yield start, stop, part.output
    else:
        yield 0, rows, reply.output


def bounds(rows: int, parts: int) -> list[tuple[int, int]]:
    """`rows` cut into `parts` contiguous ranges whose sizes differ by at most one."""
    size, extra = divmod(rows, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + size + (i < extra)
        out.append((start, stop))
        start = stop
    return out


def row_slice(tensor: WireTensor, start: int, stop: int) -> WireTensor:
    """Rows [start, stop) of a [T, ...] wire tensor, as views of its bytes (fp8: of its codes and row scales)."""
    rows = tensor.shape[0]
    data = memoryview(tensor.data)
    per_row = len(data) // rows if rows else 0
    scales = tensor.scales
    if tensor.dtype == FLOAT8_E4M3 and len(scales):  # one float32 scale per row of the last dimension
        per_scale = len(scales) // rows
        scales = memoryview(scales)[start * per_scale:stop * per_scale]
    return WireTensor(tensor.dtype, (stop - start, *tensor.shape[1:]), data[start * per_row:stop * per_row], scales)


def piece_count(request, lanes: int, min_piece_bytes: int) -> int:
    """How many pieces of rows a RunExpertsRequest goes in over `lanes` connections: 1 unless its hidden states
    travel in it and hold at least 2 x `min_piece_bytes`; never more pieces than lanes or rows."""
    hidden = request.hidden
    if hidden is None or not hidden.shape:
        return 1
    return max(1, min(lanes, len(hidden.data) // min_piece_bytes, hidden.shape[0]))


def split_rows(request, parts: int) -> list[tuple[int, int, object]]:
    """A RunExpertsRequest (zerocopy) with its tensors in the message, as `parts` requests of contiguous rows."""
    out = []
    for start, stop in bounds(request.hidden.shape[0], parts):
        out.append((start, stop, zerocopy.RunExpertsRequest(
            layer=request.layer, hidden=row_slice(request.hidden, start, stop),
            expert_ids=row_slice(request.expert_ids, start, stop), weights=row_slice(request.weights, start, stop),
            output_dtype=request.output_dtype, request_id=request.request_id,
            model_fingerprint=request.model_fingerprint)))
    return out


class Lanes:
    """RunExperts to one server over `channels`, separate connections: small calls on the first, large
    ones (hidden states of 2 x `min_piece_bytes` and more) split by rows over up to all of them."""

    def __init__(self, channels: Sequence[grpc.aio.Channel], min_piece_bytes: int = MIN_PIECE_BYTES,
                 method: str = RUN_EXPERTS):
        if not channels:
            raise ValueError("Lanes needs at least one channel")
        if min_piece_bytes < 1:
            raise ValueError(f"min_piece_bytes {min_piece_bytes} must be positive")
        self.channels = list(channels)
        self.min_piece_bytes = min_piece_bytes
        self.calls = [channel.unary_unary(method, request_serializer=zerocopy.serialize,
                                          response_deserializer=zerocopy.RunExpertsResponse.FromString,
                                          _registered_method=True) for channel in self.channels]

    def parts_for(self, request) -> int:
        """How many pieces `request` goes in: 1 unless its hidden states travel in it and are large."""
        return piece_count(request, len(self.calls), self.min_piece_bytes)

    async def __call__(self, request, timeout: float | None = None, **kwargs):
        """The reply (a RunExpertsResponse, or a StripedReply when split); AioRpcError if any piece fails."""
        parts = self.parts_for(request)
        if parts == 1:
            return await self.calls[0](request, timeout=timeout, **kwargs)
        split = split_rows(request, parts)
        tasks = [asyncio.ensure_future(call(piece, timeout=timeout, **kwargs))
                 for call, (_, _, piece) in zip(self.calls, split, strict=False)]
        try:
            replies = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # the call failed as a whole: the other pieces' answers are not wanted
                task.cancel()
            raise
        return StripedReply(tuple((start, stop, reply) for (start, stop, _), reply in zip(split, replies, strict=True)))

    async def close(self) -> None:
        """Close every lane's channel."""
        await asyncio.gather(*(channel.close() for channel in self.channels), return_exceptions=True)
