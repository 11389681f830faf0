"""Graceful stop: NOT_SERVING at once, new calls refused, in-flight calls finish with the right answer."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from moe_client import ExpertClient
from tests.support.references import plain_torch
from tests.support.waiting import wait_for


def test_stop_finishes_in_flight_calls(cluster, tiny_checkpoint):
    server = cluster.expert_server(tiny_checkpoint)
    handle = cluster.handle(server)
    executor = cluster.servicers[server].executor
    gate = threading.Event()
    executor.submit(gate.wait, 60)  # the next call waits behind this
    rng = np.random.default_rng()
    hidden, ids = rng.standard_normal((5, 64), dtype=np.float32), rng.integers(0, 8, (5, 2)).astype(np.int32)
    weights = rng.random((5, 2), dtype=np.float32)
    with ExpertClient(server, timeout=30) as client, ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(client.run_experts, 0, hidden, ids, weights)
        wait_for(lambda: handle.edge.inflight == 1, "the call in flight")
        cluster.detach(server)
        stopping = asyncio.run_coroutine_threadsafe(handle.stop(30), cluster.loop.loop)
        wait_for(lambda: client.health() == "NOT_SERVING", "NOT_SERVING")
        with pytest.raises(grpc.RpcError) as err:
            client.run_experts(0, hidden, ids, weights)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
        assert not stopping.done()
        gate.set()
        assert np.abs(in_flight.result(30) - plain_torch(tiny_checkpoint, 0, hidden, ids, weights)).max() <= 1e-5
        stopping.result(30)
