"""Replicas and failover in one process: spread, a replica lost, coverage lost and regained, a server
restarted on another checkpoint. Real servers on loopback; every answer checked against the reference."""

import time

import grpc
import numpy as np
import pytest

from moe_client import ExpertClient, GatewayClient, wire
from moe_client.pb import experts_pb2, experts_pb2_grpc
from moe_serve.model.synthetic import write_checkpoint
from tests.support.busy import bank_held
from tests.support.checkpoints import TINY
from tests.support.references import check_forward
from tests.support.waiting import wait_for


def pool_of(cluster, gateway: str):
    """The ServerPool inside an in-process gateway."""
    return cluster.servicers[gateway].engine.experts.inner.pool


def try_forward(client: GatewayClient, checkpoint) -> bool:
    check_forward(client, checkpoint)
    return True


def test_replicas_share_the_work(cluster, tiny_checkpoint):
    a, b = (cluster.expert_server(tiny_checkpoint) for _ in range(2))
    gateway = cluster.gateway(tiny_checkpoint, [a, b])
    with GatewayClient(gateway) as client:
        for _ in range(6):
            check_forward(client, tiny_checkpoint)
    served = [cluster.handle(x).edge.served for x in (a, b)]
    assert min(served) > 0, served  # least outstanding work, ties broken by least recent work


def test_a_lost_replica_costs_no_request(cluster, tiny_checkpoint):
    a, b = (cluster.expert_server(tiny_checkpoint, experts=e) for e in ("0-7", "0-7"))
    c = cluster.expert_server(tiny_checkpoint, experts="0-3")
    gateway = cluster.gateway(tiny_checkpoint, [a, b, c])
    with GatewayClient(gateway) as client:
        check_forward(client, tiny_checkpoint)
        cluster.stop_one(a)
        cluster.stop_one(c)
        for _ in range(5):
            check_forward(client, tiny_checkpoint)
        assert [s.address for s in client.model_info().servers] == [b]


def test_coverage_lost_then_regained(cluster, tiny_checkpoint):
    a = cluster.expert_server(tiny_checkpoint, experts="0-3")
    b = cluster.expert_server(tiny_checkpoint, experts="4-7")
    port_b = int(b.rsplit(":", 1)[1])
    gateway = cluster.gateway(tiny_checkpoint, [a, b], rpc_timeout=5.0)
    with GatewayClient(gateway) as client:
        check_forward(client, tiny_checkpoint)
        cluster.stop_one(b)
        hidden = np.random.default_rng().standard_normal((64, 64), dtype=np.float32)
        with pytest.raises(grpc.RpcError) as err:
            client.forward(hidden)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "no expert server can run layer 0 experts" in err.value.details()
        assert b in err.value.details()  # names the owner that is down
        # The gateway stays up and answers, but says it cannot serve (load balancers stop sending work).
        assert client.model_info().hidden_size == 64
        wait_for(lambda: client.health() == "NOT_SERVING", "health NOT_SERVING while experts 4-7 are unserved")

        cluster.expert_server(tiny_checkpoint, experts="4-7", port=port_b)  # the same server comes back
        wait_for(lambda: try_forward(client, tiny_checkpoint), "the gateway serving again")
        wait_for(lambda: client.health() == "SERVING", "health SERVING again")


def test_server_restarted_on_another_checkpoint_is_refused(cluster, tiny_checkpoint, tmp_path):
    other = write_checkpoint(tmp_path / "other", TINY.__class__(**{**TINY.__dict__, "seed": 7}))
    a, b = (cluster.expert_server(tiny_checkpoint) for _ in range(2))
    port_b = int(b.rsplit(":", 1)[1])
    gateway = cluster.gateway(tiny_checkpoint, [a, b])
    with GatewayClient(gateway) as client:
        mine = client.model_info().model_fingerprint
        cluster.stop_one(b)
        b2 = cluster.expert_server(other, port=port_b)
        theirs = ExpertClient(b2).info().model_fingerprint
        assert theirs != mine
        # the gateway notices by itself and keeps serving from the replica on its own checkpoint
        wait_for(lambda: pool_of(cluster, gateway).replicas[b].refused, "the other checkpoint refused")
        assert [s.address for s in client.model_info().servers] == [a]
        for _ in range(3):
            check_forward(client, tiny_checkpoint)

        # the server refuses a call made for another checkpoint, naming both
        stub = experts_pb2_grpc.ExpertServiceStub(grpc.insecure_channel(b2))
        request = experts_pb2.RunExpertsRequest(
            layer=0, hidden=wire.encode(np.ones((1, 64), np.float32)), model_fingerprint=mine,
            expert_ids=wire.encode(np.array([[1]], np.int32)), weights=wire.encode(np.ones((1, 1), np.float32)))
        with pytest.raises(grpc.RpcError) as err:
            stub.RunExperts(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert mine in err.value.details() and theirs in err.value.details()

        # a down and b on another checkpoint: UNAVAILABLE (a may come back), naming both fingerprints
        cluster.stop_one(a)
        with pytest.raises(grpc.RpcError) as err:
            client.forward(np.random.default_rng().standard_normal((8, 64), dtype=np.float32))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert mine in err.value.details() and theirs in err.value.details()


def test_only_server_on_another_checkpoint_is_failed_precondition(cluster, tiny_checkpoint, tmp_path):
    other = write_checkpoint(tmp_path / "other", TINY.__class__(**{**TINY.__dict__, "seed": 8}))
    a = cluster.expert_server(tiny_checkpoint)
    gateway = cluster.gateway(tiny_checkpoint, [a])
    with GatewayClient(gateway) as client:
        check_forward(client, tiny_checkpoint)
        mine = client.model_info().model_fingerprint
        cluster.stop_one(a)
        theirs = ExpertClient(cluster.expert_server(other, port=int(a.rsplit(":", 1)[1]))).info().model_fingerprint

        def refused() -> bool:
            with pytest.raises(grpc.RpcError) as err:
                client.forward(np.random.default_rng().standard_normal((8, 64), dtype=np.float32))
            return err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and err.value

        err = wait_for(refused, "FAILED_PRECONDITION from the gateway")
        assert mine in err.details() and theirs in err.details()


@pytest.mark.parametrize("same_host_calls", [True, False])
def test_a_stuck_replica_is_passed_over_within_the_deadline(cluster, tiny_checkpoint, same_host_calls):
    a, b = (cluster.expert_server(tiny_checkpoint) for _ in range(2))
    gateway = cluster.gateway(tiny_checkpoint, [a, b], rpc_timeout=0.5, same_host_calls=same_host_calls)
    with bank_held(cluster.servicers[a]), GatewayClient(gateway, timeout=20) as client:  # a's calls pass their deadline
        for _ in range(4):
            check_forward(client, tiny_checkpoint)


def test_a_skipped_replica_still_serves_when_it_is_the_last(cluster, tiny_checkpoint):
    a, b = (cluster.expert_server(tiny_checkpoint) for _ in range(2))
    gateway = cluster.gateway(tiny_checkpoint, [a, b])
    pool = pool_of(cluster, gateway)
    with GatewayClient(gateway) as client:
        check_forward(client, tiny_checkpoint)
        for _ in range(5):  # a slow first call or two got `a` skipped for a while (up to 10 s)
            pool.report_failure(pool.replicas[a], "DEADLINE_EXCEEDED: slow")
            pool.replicas[a].ejected_until = time.monotonic() + 60
        cluster.stop_one(b)  # ... just as the other replica stops
        wait_for(lambda: not pool.replicas[b].serving, "b seen as down")
        for _ in range(3):
            check_forward(client, tiny_checkpoint)  # `a` is skipped only while something else can serve
