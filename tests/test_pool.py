"""The pool's choices without a network: least outstanding work, exclusions, missing experts, ejection."""

import asyncio
import time

import grpc

from moe_client.pb import experts_pb2
from moe_serve.gateway.pool import ServerPool
from moe_serve.gateway.replica import Replica
from moe_serve.gateway.resolve import resolve, split_target
from moe_serve.model.config import spec_from_config
from moe_serve.model.synthetic import SyntheticConfig

SPEC = spec_from_config(SyntheticConfig(num_experts=4, num_hidden_layers=1).to_json())


def pool_of(owned: dict[str, list[int]]) -> ServerPool:
    """A pool whose replicas own `owned` experts of layer 0 and are all SERVING (channels never dialled)."""
    pool = ServerPool(list(owned), SPEC, "f" * 16)
    for address, experts in owned.items():
        replica = pool.replicas[address] = Replica(address, address, grpc.aio.insecure_channel(address))
        replica.serving = True
        pool._set_info(replica, experts_pb2.GetInfoResponse(model_fingerprint="f" * 16, server_name=address, owned=[
            experts_pb2.LayerExperts(layer=0, experts=experts)]))
    return pool


def test_assign_spreads_by_outstanding_work():
    async def body():
        pool = pool_of({"a:1": [0, 1, 2, 3], "b:1": [0, 1, 2, 3]})
        a, b = pool.replicas["a:1"], pool.replicas["b:1"]
        a.outstanding = 10  # a is busy: everything goes to b while b's planned load stays lighter
        plan, missing = pool.assign(0, {0: 3, 1: 2, 2: 2})
        assert missing == [] and plan == {b: [0, 1, 2]}
        a.outstanding = 0  # both idle: the biggest expert first (to a, picked less often), then the lighter side
        plan, _ = pool.assign(0, {0: 5, 1: 3, 2: 2})
        assert plan == {a: [0], b: [1, 2]}
        plan, _ = pool.assign(0, {0: 1}, excluded=frozenset({"a:1", "b:1"}))
        assert plan == {}

    asyncio.run(body())


def test_missing_and_ejected_experts():
    async def body():
        pool = pool_of({"a:1": [0, 1], "b:1": [2]})
        a = pool.replicas["a:1"]
        plan, missing = pool.assign(0, {0: 1, 3: 1})
        assert missing == [3] and plan == {a: [0]}
        assert pool.uncovered() == ["layer 0: experts 3"]
        for _ in range(4):  # four calls failing together eject once, for the shortest pause
            pool.report_failure(a, "UNAVAILABLE: gone")
        assert a.failures == 1 and 0 < a.ejected_until - time.monotonic() <= 0.5
        b = pool.replicas["b:1"] = Replica("b:1", "b:1", grpc.aio.insecure_channel("b:1"))
        b.serving = True
        pool._set_info(b, experts_pb2.GetInfoResponse(model_fingerprint="f" * 16, server_name="b:1", owned=[
            experts_pb2.LayerExperts(layer=0, experts=[0, 2])]))
        assert pool.assign(0, {0: 1})[0] == {b: [0]}  # the skipped replica is passed over ...
        assert pool.assign(0, {0: 1}, excluded=frozenset({"b:1"}))[0] == {a: [0]}  # ... unless it is the last
        a.serving = False  # down: never tried
        plan, missing = pool.assign(0, {0: 1}, excluded=frozenset({"b:1"}))
        assert plan == {} and missing == [0]
        why, refused = pool.explain(0, [0])
        assert "a:1 (a:1) down (UNAVAILABLE: gone)" in why and not refused

    asyncio.run(body())


def test_targets_resolve():
    async def body():
        assert await resolve("10.0.0.7:50051") == {"10.0.0.7:50051": ""}
        assert await resolve("unix:/tmp/x.sock") == {"unix:/tmp/x.sock": ""}
        assert await resolve("localhost:7") == {"127.0.0.1:7": "localhost"}

    asyncio.run(body())
    assert split_target("[::1]:5") == ("::1", 5)
