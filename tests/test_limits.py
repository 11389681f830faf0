"""Deadlines and limits: bounded queues answer RESOURCE_EXHAUSTED, big messages are refused, deadlines hold."""

import contextlib
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from moe_client import ExpertClient, GatewayClient
from moe_serve.gateway.batching_config import BatchingConfig
from moe_serve.rpc.options import ServingOptions
from tests.support.busy import bank_held
from tests.support.references import plain_torch, reference_forward
from tests.support.waiting import wait_for


class Blocker:
    """Keeps expert servers' devices busy (their bank lock held), so their calls wait, over gRPC or the
    same-host channel, until release()."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.stack = contextlib.ExitStack()

    def block(self, address: str) -> None:
        self.stack.enter_context(bank_held(self.cluster.servicers[address]))

    def release(self) -> None:
        self.stack.close()


@pytest.fixture
def blocker(cluster):
    b = Blocker(cluster)
    yield b
    b.release()


def random_call(rows: int = 3):
    rng = np.random.default_rng()
    return (rng.standard_normal((rows, 64), dtype=np.float32), rng.integers(0, 8, size=(rows, 2)).astype(np.int32),
            rng.random((rows, 2), dtype=np.float32))


def test_expert_server_queue_is_bounded(cluster, tiny_checkpoint, blocker):
    server = cluster.expert_server(tiny_checkpoint, serving=ServingOptions(max_queue=1))
    blocker.block(server)
    hidden, ids, weights = random_call()
    with ExpertClient(server, timeout=30) as client, ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.run_experts, 0, hidden, ids, weights)
        wait_for(lambda: cluster.handle(server).edge.admitted == 1, "the first call admitted")
        with pytest.raises(grpc.RpcError) as err:
            client.run_experts(0, *random_call())
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the limit is 1" in err.value.details()
        assert client.health() == "SERVING"  # probes are never refused
        blocker.release()
        assert np.abs(waiting.result(30) - plain_torch(tiny_checkpoint, 0, hidden, ids, weights)).max() <= 1e-5
        hidden, ids, weights = random_call()
        assert np.abs(client.run_experts(1, hidden, ids, weights)
                      - plain_torch(tiny_checkpoint, 1, hidden, ids, weights)).max() <= 1e-5


def test_messages_are_bounded(cluster, tiny_checkpoint):
    server = cluster.expert_server(tiny_checkpoint, serving=ServingOptions(max_message_bytes=16 * 1024))
    with ExpertClient(server) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.run_experts(0, *random_call(rows=100))  # 100 x 64 fp32 = 25.6 KB
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.details()
        hidden, ids, weights = random_call()
        assert np.abs(client.run_experts(0, hidden, ids, weights)
                      - plain_torch(tiny_checkpoint, 0, hidden, ids, weights)).max() <= 1e-5


def test_gateway_queue_is_bounded(cluster, tiny_checkpoint, blocker):
    server = cluster.expert_server(tiny_checkpoint)
    gateway = cluster.gateway(tiny_checkpoint, [server], serving=ServingOptions(max_queue=2), same_host_calls=False)
    blocker.block(server)
    inputs = [np.random.default_rng().standard_normal((5, 64), dtype=np.float32) for _ in range(2)]
    with GatewayClient(gateway, timeout=30) as client, ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(client.forward, x) for x in inputs]
        wait_for(lambda: cluster.handle(gateway).edge.admitted == 2, "two requests admitted")
        with pytest.raises(grpc.RpcError) as err:
            client.forward(inputs[0])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Forward: 2 requests in flight, the limit is 2" in err.value.details()
        assert client.model_info().hidden_size == 64  # cheap calls still answer
        blocker.release()
        for x, future in zip(inputs, waiting, strict=True):
            assert np.abs(future.result(30) - reference_forward(tiny_checkpoint, x)).max() <= 1e-5


def test_caller_deadline_reaches_the_expert_call_and_the_gateway_recovers(cluster, tiny_checkpoint, blocker):
    server = cluster.expert_server(tiny_checkpoint)
    # rpc_timeout 60 s: the caller's 3 s must bound the expert call (requests run alone without batching).
    # By gRPC, whose server-side admission count shows the call waiting (the same-host channel: test_same_host_calls).
    gateway = cluster.gateway(tiny_checkpoint, [server], batching=BatchingConfig(batching=False),
                              same_host_calls=False)
    edge = cluster.handle(server).edge
    blocker.block(server)
    hidden = np.random.default_rng().standard_normal((4, 64), dtype=np.float32)
    with GatewayClient(gateway, timeout=3.0) as client, ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.forward, hidden)
        wait_for(lambda: edge.admitted == 1, "the expert call waiting on the blocked server")
        with pytest.raises(grpc.RpcError) as err:
            call.result(30)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # the gateway gave up on the expert call at the caller's deadline, not after rpc_timeout
        wait_for(lambda: edge.admitted == 0, "the expert call cancelled", timeout=20)
        blocker.release()
        client.timeout = 30
        wait_for(lambda: np.abs(client.forward(hidden) - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5,
                 "a correct answer after the stall")


def test_rpc_timeout_bounds_each_expert_call(cluster, tiny_checkpoint, blocker):
    server = cluster.expert_server(tiny_checkpoint)
    gateway = cluster.gateway(tiny_checkpoint, [server], rpc_timeout=0.5)
    blocker.block(server)
    with GatewayClient(gateway, timeout=30) as client, pytest.raises(grpc.RpcError) as err:
        client.forward(np.random.default_rng().standard_normal((4, 64), dtype=np.float32))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "DEADLINE_EXCEEDED" in err.value.details() and "layer 0 experts" in err.value.details()
