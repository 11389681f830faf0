"""Large RunExperts calls split by rows over several connections (moe_client.striping): the pieces are
ordinary requests, the gateway adds them where the whole would go, and a failing piece fails the call."""

import itertools

import numpy as np
import pytest
import torch

from moe_client import GatewayClient, striping, wire, zerocopy
from moe_client.channel import insecure_aio_channel
from moe_client.striping import Lanes, StripedReply, bounds, row_slice, split_rows
from moe_serve.gateway.batching_config import BatchingConfig
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.rpc.codec import from_wire, to_wire
from tests.support.references import plain_torch, reference_forward

H = 64  # the tiny checkpoint's hidden size


@pytest.mark.parametrize("rows, parts", [(1, 1), (7, 3), (8, 4), (4096, 3), (5, 5)])
def test_bounds_cover_the_rows_once_in_near_equal_pieces(rows, parts):
    cut = bounds(rows, parts)
    assert cut[0][0] == 0 and cut[-1][1] == rows
    assert all(a[1] == b[0] for a, b in itertools.pairwise(cut))
    sizes = [stop - start for start, stop in cut]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("dtype", [wire.FLOAT32, wire.BFLOAT16, wire.FLOAT8_E4M3])
def test_pieces_are_views_of_the_rows_and_decode_to_them(dtype):
    rng = np.random.default_rng()
    tokens = int(rng.integers(5, 50))
    hidden = torch.from_numpy(rng.standard_normal((tokens, H), dtype=np.float32))
    ids = torch.from_numpy(rng.integers(-1, 8, (tokens, 2)).astype(np.int32))
    weights = torch.from_numpy(rng.random((tokens, 2), dtype=np.float32))
    request = zerocopy.RunExpertsRequest(layer=1, hidden=to_wire(hidden, dtype), expert_ids=to_wire(ids),
                                         weights=to_wire(weights), request_id="r", model_fingerprint="f")
    whole = from_wire(request.hidden, "hidden")
    parts = split_rows(request, 3)
    assert [p[:2] for p in parts] == bounds(tokens, 3)
    for start, stop, piece in parts:
        assert (piece.layer, piece.request_id, piece.model_fingerprint) == (1, "r", "f")
        assert torch.equal(from_wire(piece.hidden, "hidden"), whole[start:stop])  # fp8: its own rows' scales
        assert torch.equal(from_wire(piece.expert_ids, "expert_ids"), ids[start:stop])
        assert torch.equal(from_wire(piece.weights, "weights"), weights[start:stop])
        assert piece.hidden.data.obj is request.hidden.data.obj  # a view, not a copy
    assert row_slice(request.hidden, 0, tokens).data == request.hidden.data


def test_only_large_calls_with_bytes_in_the_message_are_split(loop_thread):
    lanes = loop_thread.run(_open_lanes("127.0.0.1:1", 4, min_piece_bytes=1000))
    try:
        def request(tokens):
            return zerocopy.RunExpertsRequest(hidden=to_wire(torch.randn(tokens, H)))  # 256 bytes a row
        assert lanes.parts_for(request(3)) == 1  # 768 bytes: below one piece
        assert lanes.parts_for(request(8)) == 2  # 2,048 bytes: two pieces of 1,000 at least
        assert lanes.parts_for(request(100)) == 4  # never more than the lanes
        assert lanes.parts_for(zerocopy.RunExpertsRequest()) == 1  # hidden states in shared memory
    finally:
        loop_thread.run(lanes.close())


async def _open_lanes(address: str, n: int, min_piece_bytes: int) -> Lanes:
    return Lanes([insecure_aio_channel(address, striping.LANE_OPTIONS) for _ in range(n)], min_piece_bytes)


def test_a_split_call_equals_the_reference(cluster, tiny_checkpoint, loop_thread):
    server = cluster.expert_server(tiny_checkpoint)
    rng = np.random.default_rng()
    tokens = int(rng.integers(40, 200))
    hidden = rng.standard_normal((tokens, H), dtype=np.float32)
    ids = np.stack([rng.permutation(8)[:2] for _ in range(tokens)]).astype(np.int32)
    weights = rng.random((tokens, 2), dtype=np.float32)
    request = zerocopy.RunExpertsRequest(
        layer=0, hidden=to_wire(torch.from_numpy(hidden)), expert_ids=to_wire(torch.from_numpy(ids)),
        weights=to_wire(torch.from_numpy(weights)), model_fingerprint=Checkpoint(tiny_checkpoint).fingerprint())
    lanes = loop_thread.run(_open_lanes(server, 3, min_piece_bytes=H * 4 * 10))

    async def call():
        return await lanes(request, timeout=30)

    try:
        reply = loop_thread.run(call())
    finally:
        loop_thread.run(lanes.close())
    assert isinstance(reply, StripedReply) and len(reply.pieces) == 3
    got = np.zeros_like(hidden)
    for start, stop, output in striping.pieces(reply, tokens):
        got[start:stop] = from_wire(output, "output").numpy()
    assert np.abs(got - plain_torch(tiny_checkpoint, 0, hidden, ids, weights)).max() <= 1e-5


def _count_splits(monkeypatch) -> list[int]:
    splits: list[int] = []
    split = striping.split_rows

    def recording(request, parts):
        splits.append(parts)
        return split(request, parts)

    monkeypatch.setattr(striping, "split_rows", recording)
    return splits


def test_forward_over_lanes_equals_reference(cluster, tiny_checkpoint, monkeypatch):
    splits = _count_splits(monkeypatch)
    servers = [cluster.expert_server(tiny_checkpoint, experts=e) for e in ("0-2", "3-7")]
    # The gRPC path's lanes: no TCP side channel.
    gateway = cluster.gateway(tiny_checkpoint, servers, shared_memory=False, tcp_calls=False, tcp_lanes=3,
                              min_piece_bytes=H * 4 * 8,
                              batching=BatchingConfig(batching=False))
    rng = np.random.default_rng()
    for tokens in (1, int(rng.integers(100, 400))):
        hidden = rng.standard_normal((tokens, H), dtype=np.float32)
        with GatewayClient(gateway) as client:
            got = client.forward(hidden)
        assert np.abs(got - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5
    # 100+ tokens x top-2 of 8 experts: every server gets far more than 3 pieces' worth of rows, per layer.
    assert splits.count(3) >= 2 * len(servers)


def test_a_replica_that_dies_fails_its_pieces_over_to_another(cluster, tiny_checkpoint, monkeypatch):
    splits = _count_splits(monkeypatch)
    first, second = (cluster.expert_server(tiny_checkpoint) for _ in range(2))
    gateway = cluster.gateway(tiny_checkpoint, [first, second], shared_memory=False, tcp_calls=False, tcp_lanes=4,
                              min_piece_bytes=H * 4 * 8, rpc_timeout=5.0, batching=BatchingConfig(batching=False))
    hidden = np.random.default_rng().standard_normal((300, H), dtype=np.float32)
    want = reference_forward(tiny_checkpoint, hidden)
    with GatewayClient(gateway, timeout=30) as client:
        assert np.abs(client.forward(hidden) - want).max() <= 1e-5
        cluster.stop_one(first)  # as a crash: its lanes' connections drop
        for _ in range(3):
            assert np.abs(client.forward(hidden) - want).max() <= 1e-5
    assert splits and set(splits) == {4}
