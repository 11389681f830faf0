"""Generate keeps every token: a replica killed (kill -9) in the middle of a stream, and a rebalance while
streams run, change nothing the user sees: the greedy tokens of a run without the change, none lost or
repeated, and no failed request. Real servers on loopback (processes for the kill)."""

import signal
import threading

import pytest

from moe_client import GatewayClient
from moe_client.admin import AdminClient
from moe_serve.tools.rebalance import Rebalance, schedule
from tests.support.load import Load
from tests.support.process_cluster import ProcessCluster

TOKEN = "admin-secret"
NEW_TOKENS = 24


def stream(address: str, prompt: list[int], at: int, action) -> list[int]:
    """A greedy Generate stream of NEW_TOKENS tokens; `action()` runs once the `at`-th token has arrived."""
    got = []
    with GatewayClient(address, timeout=120) as client:
        for token in client.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True):
            got.append(token.token_id)
            if len(got) == at:
                action()
    return got


@pytest.mark.timeout(600)
def test_replica_killed_mid_stream_keeps_every_token(causal_checkpoints, tmp_path):
    checkpoint = causal_checkpoints["mixtral"]
    cluster = ProcessCluster(checkpoint, tmp_path, replicas=2, gateway_args=("--rpc-timeout", "5", "--keepalive", "1"))
    try:
        cluster.start()
        a, _ = cluster.experts
        # Prompts whose top two logits stay apart at every step, continued in this process (Load's reference).
        load = Load(cluster.address, checkpoint, clients=2, tokens=8, generate_share=1.0, new_tokens=NEW_TOKENS,
                    distinct_inputs=3)
        load.start()
        try:
            load.wait_ok(4)
            got = stream(cluster.address, load.prompts[0], NEW_TOKENS // 3, lambda: a.signal(signal.SIGKILL))
            assert a.wait(10) == -signal.SIGKILL
            assert got == load.continuations[0]  # same tokens, none lost, none repeated
            load.wait_ok(6)
        finally:
            load.stop()
        assert load.failed == 0, load.first_errors
    finally:
        cluster.stop()


def test_rebalance_mid_stream_keeps_every_token(cluster, causal_checkpoints):
    checkpoint = causal_checkpoints["mixtral"]
    servers = [cluster.expert_server(checkpoint, experts=e, admin_token=TOKEN) for e in ("0-3", "4-7")]
    gateway = cluster.gateway(checkpoint, servers)
    load = Load(gateway, checkpoint, clients=2, tokens=8, generate_share=1.0, new_tokens=NEW_TOKENS,
                distinct_inputs=3).start()
    clients = [AdminClient(s, token=TOKEN) for s in servers]
    done = threading.Event()
    try:
        load.wait_ok(4)
        current = [c.owned() for c in clients]
        target = [{layer: (0, 1, 4, 5) for layer in current[0]}, {layer: (2, 3, 6, 7) for layer in current[0]}]
        job = Rebalance(clients, ["a", "b"], say=lambda line: None)

        def rebalance() -> None:
            job.lock()
            try:
                job.apply(schedule(current, target, [16, 16]))
            finally:
                job.unlock()
                done.set()

        worker = threading.Thread(target=rebalance)
        got = stream(gateway, load.prompts[0], 2, worker.start)
        assert got == load.continuations[0]
        worker.join(60)
        assert done.is_set() and [c.owned() for c in clients] == target
        load.wait_ok(6)
    finally:
        load.stop()
        for c in clients:
            c.close()
    assert load.failed == 0, load.first_errors
