"""Device-routed calls (expert_server/routed_calls.py, gateway/side_dispatch.start_routed): the routing left in
shared memory beside the hidden states, every token to every server, each server told which experts it computes.
On a GPU that is how the dense layers' step avoids waiting for the GPU at each MoE layer (the GPU-only tests cover
the events); here, on /dev/shm, the same protocol: sums equal the reference, listed experts only, bad requests get
their gRPC codes, failover works."""

import grpc
import numpy as np
import pytest
import torch

from moe_client import GatewayClient, wire, zerocopy
from moe_serve.gateway.batching_config import BatchingConfig
from moe_serve.rpc.shared_regions import Arena, aligned
from moe_serve.rpc.side_channel import ChannelError, SideLink
from tests.support.failover import forwards_while_one_stops
from tests.support.references import plain_torch, reference_forward


def _dispatcher(cluster, gateway: str):
    return cluster.servicers[gateway].engine.experts.inner


def _routed_gateway(cluster, checkpoint, servers) -> str:
    gateway = cluster.gateway(checkpoint, servers, batching=BatchingConfig(batching=False))
    _dispatcher(cluster, gateway).device_routing = True  # on the host too: the GPU's protocol, on /dev/shm
    return gateway


@pytest.mark.parametrize("experts", [("0-2", "3-7"), ("0-7", "0-7")], ids=["split", "replicas"])
def test_forward_with_device_routing_equals_reference(cluster, tiny_checkpoint, experts):
    """Split experts, or two replicas of each (the plan gives each expert to one of them, so none is counted
    twice): every Forward equals the reference, and every MoE layer went device-routed."""
    servers = [cluster.expert_server(tiny_checkpoint, experts=e) for e in experts]
    gateway = _routed_gateway(cluster, tiny_checkpoint, servers)
    rng = np.random.default_rng()
    sizes = (1, 7, int(rng.integers(200, 400)), 7, 7)  # 7 again: the servers see the same places of an arena
    with GatewayClient(gateway) as client:
        for n in sizes:
            x = rng.standard_normal((n, 64), dtype=np.float32)
            assert np.abs(client.forward(x) - reference_forward(tiny_checkpoint, x)).max() <= 1e-5
    dispatcher = _dispatcher(cluster, gateway)
    assert dispatcher.routed_rounds == 2 * len(sizes)  # 2 MoE layers a Forward, none host-routed
    assert all(r.outstanding == 0 for r in dispatcher.pool.members)
    # Answered calls leave a server's in-flight list (what a live drop waits for), though the views of the
    # caller's memory they read are kept for the next call: at most the last call's entry is left.
    assert all(len(cluster.expert_servicers[s].calls._calls) <= 1 for s in servers)
    # Split, each expert has one owner: the plan is fixed (cached); replicas leave a choice (the pool's assign).
    plan = dispatcher.pool.sole_plan(0)
    if experts[0] == experts[1]:
        assert plan is None
    else:
        assert {r.address: e for r, e in plan.items()} == {servers[0]: [0, 1, 2], servers[1]: [3, 4, 5, 6, 7]}


def test_the_gateway_flag_decides_where_routing_goes(cluster, tiny_checkpoint):
    """--routed-calls (default on) routes on the dense layers' GPU only; --no-routed-calls never."""
    server = cluster.expert_server(tiny_checkpoint, experts="0-7")
    default = _dispatcher(cluster, cluster.gateway(tiny_checkpoint, [server]))
    off = _dispatcher(cluster, cluster.gateway(tiny_checkpoint, [server], routed_calls=False))
    assert default.routes_on(torch.device("cuda", 0)) and not default.routes_on(torch.device("cpu"))
    assert not off.routes_on(torch.device("cuda", 0)) and not off.routes_on(torch.device("cpu"))


def test_a_routed_server_that_stops_fails_over(cluster, tiny_checkpoint):
    """A device-routed share whose server stopped goes to the other replica with the routing brought to the host
    (the gRPC failover's plan); no Forward fails or differs from the reference."""
    servers = [cluster.expert_server(tiny_checkpoint, experts="0-7") for _ in range(2)]
    gateway = _routed_gateway(cluster, tiny_checkpoint, servers)
    forwards_while_one_stops(cluster, gateway, tiny_checkpoint, servers[0], forwards=10, stop_before=3)
    assert _dispatcher(cluster, gateway).routed_rounds >= 2 * 7  # the survivor, routed again after the failure


def _chunks(request) -> list:
    """A zerocopy message's bytes as the pieces a side-channel frame sends."""
    return request._type.chunks(request)[0]


class _RoutedCall:
    """A device-routed request built by hand in a /dev/shm arena: hidden [T, 64] float32, ids and weights [T, K]."""

    def __init__(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        t, k = ids.shape
        self.ids_at = aligned(hidden.numel() * 4)
        self.weights_at = self.ids_at + aligned(t * k * 8)
        self.out_at = self.weights_at + aligned(t * k * 4)
        self.arena = Arena(torch.device("cpu"), self.out_at + hidden.numel() * 4)
        self.arena.view(0, wire.FLOAT32, tuple(hidden.shape)).copy_(hidden)
        self.arena.view(self.ids_at, wire.INT64, (t, k)).copy_(ids)
        self.arena.view(self.weights_at, wire.FLOAT32, (t, k)).copy_(weights)
        self.shape, self.k = tuple(hidden.shape), k

    def request(self, layer: int, experts, shared_weights=None, **fields):
        t = self.shape[0]
        r = zerocopy.RunExpertsRequest(layer=layer, experts=list(experts), **fields)
        r.shared_hidden = self.arena.message(0, wire.FLOAT32, self.shape)
        r.shared_expert_ids = self.arena.message(self.ids_at, wire.INT64, (t, self.k))
        r.shared_weights = shared_weights or self.arena.message(self.weights_at, wire.FLOAT32, (t, self.k))
        r.shared_output = self.arena.message(self.out_at, wire.FLOAT32, self.shape)
        return _chunks(r)

    def output(self) -> np.ndarray:
        return self.arena.view(self.out_at, wire.FLOAT32, self.shape).numpy().copy()


@pytest.mark.parametrize("listing", ["some", "all held"])
def test_a_routed_call_computes_only_the_listed_experts(cluster, tiny_checkpoint, listing):
    """Ids of experts not listed or not held here, -1 and ids out of range (99) are skipped; the listed ones are
    summed exactly as the checkpoint's tensors say. (Listing all the layer's experts here is the case where the
    server leaves the skipping to expert_sums.)"""
    server = cluster.expert_server(tiny_checkpoint, experts="0-5")
    link = SideLink(cluster.expert_servicers[server].side.address)
    rng = np.random.default_rng()
    t = int(rng.integers(5, 40))
    hidden = torch.from_numpy(rng.standard_normal((t, 64), dtype=np.float32))
    ids = torch.from_numpy(rng.integers(-1, 8, (t, 3)))
    ids[0, 0] = 99
    weights = torch.from_numpy(rng.random((t, 3), dtype=np.float32))
    listed = sorted(rng.choice(6, size=3, replace=False).tolist()) if listing == "some" else list(range(6))
    call = _RoutedCall(hidden, ids, weights)
    try:
        link.receive(link.send(call.request(1, listed)), 10)
        kept = torch.where(torch.isin(ids, torch.tensor(listed)), ids, -1)
        want = plain_torch(tiny_checkpoint, 1, hidden.numpy(), kept.numpy(), weights.numpy())
        assert np.abs(call.output() - want).max() <= 1e-5
    finally:
        link.close()
        call.arena.close()


def test_bad_routed_requests_get_the_grpc_codes_and_the_server_goes_on(cluster, tiny_checkpoint):
    server = cluster.expert_server(tiny_checkpoint, experts="0-5")
    link = SideLink(cluster.expert_servicers[server].side.address)
    t = 6
    hidden = torch.randn(t, 64)
    ids = torch.randint(0, 6, (t, 2))
    call = _RoutedCall(hidden, ids, torch.rand(t, 2))
    wrong = _RoutedCall(hidden, torch.randint(0, 6, (t, 3)), torch.rand(t, 3))  # its weights: [T, 3]
    cases = [
        (call.request(0, [2, 7]), grpc.StatusCode.NOT_FOUND, "7"),
        (call.request(0, []), grpc.StatusCode.INVALID_ARGUMENT, "experts: empty"),
        (call.request(0, [3, 1]), grpc.StatusCode.INVALID_ARGUMENT, "ascending"),
        (call.request(0, [1], gpu_event=b"\1" * 64), grpc.StatusCode.INVALID_ARGUMENT, "host memory"),
        (call.request(0, [1], gpu_event=b"\1" * 5), grpc.StatusCode.INVALID_ARGUMENT, "5 bytes"),
        (call.request(0, [1], shared_weights=wrong.arena.message(wrong.weights_at, wire.FLOAT32, (t, 3))),
         grpc.StatusCode.INVALID_ARGUMENT, "shared_weights"),
        (_chunks(zerocopy.RunExpertsRequest(layer=0, gpu_event=b"\1" * 64)), grpc.StatusCode.INVALID_ARGUMENT,
         "gpu_event"),
    ]
    try:
        for payload, code, words in cases:
            with pytest.raises(ChannelError) as err:
                link.receive(link.send(payload), 10)
            assert err.value.code == code and words in err.value.details, err.value
        link.receive(link.send(call.request(0, [0, 1, 2, 3, 4, 5])), 10)  # the server goes on
        want = plain_torch(tiny_checkpoint, 0, hidden.numpy(), ids.numpy(), call.arena.view(
            call.weights_at, wire.FLOAT32, (t, 2)).numpy())
        assert np.abs(call.output() - want).max() <= 1e-5
    finally:
        link.close()
        call.arena.close()
        wrong.arena.close()
