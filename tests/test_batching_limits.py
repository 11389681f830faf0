"""Bounded queues: a full one answers RESOURCE_EXHAUSTED and the gateway keeps serving; a cancelled
stream gives its slot to the next request.

The expert server's compute thread is kept busy (a task waiting on an event) so that batches stall
on their expert calls and requests pile up in the gateway: no timing decides what is queued.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from moe_client import GatewayClient
from moe_serve.gateway.batching_config import BatchingConfig
from tests.support.hf_models import build_checkpoint
from tests.support.references import random_prompts, reference_greedy
from tests.support.waiting import wait_for


def stuck_calls(cluster, server: str) -> int:
    """RunExperts calls the busy expert server holds."""
    return len(cluster.expert_servicers[server].merger._pending)


def test_full_forward_queue_is_refused_and_the_gateway_recovers(cluster, tiny_checkpoint):
    server = cluster.expert_server(tiny_checkpoint)
    # By gRPC: the busy server's queue (merger._pending) shows the batch arrived (the same-host channel has none).
    gateway = cluster.gateway(tiny_checkpoint, [server], same_host_calls=False,
                              batching=BatchingConfig(max_queued_requests=2, max_batch_tokens=16))
    batcher = cluster.servicers[gateway].batcher
    busy = threading.Event()
    cluster.expert_servicers[server].executor.submit(busy.wait, 60)  # RunExperts calls wait behind this
    inputs = [np.random.default_rng().standard_normal((16, 64), dtype=np.float32) for _ in range(3)]
    with GatewayClient(gateway) as client, ThreadPoolExecutor(3) as pool:
        try:
            first = pool.submit(client.forward, inputs[0])
            wait_for(lambda: stuck_calls(cluster, server) > 0, "the first batch to reach the busy server")
            queued = [pool.submit(client.forward, x) for x in inputs[1:]]
            wait_for(lambda: len(batcher._queue) == 2, "two queued requests")
            with pytest.raises(grpc.RpcError) as err:
                client.forward(inputs[0])
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-queued-requests 2" in err.value.details()
        finally:
            busy.set()
        outs = [f.result(60) for f in [first, *queued]]
        again = client.forward(inputs[2])
    want = cluster.servicers[gateway].engine.forward
    for x, got in zip(inputs, outs, strict=True):
        assert np.abs(got - want(torch.from_numpy(x))[0].numpy()).max() <= 1e-5
    assert np.array_equal(again, outs[2])  # the same request alone in a batch: the same numbers


def test_full_generate_queue_and_cancel_frees_the_slot(cluster, tmp_path):
    # A long context, so the stream that is cancelled would otherwise run for minutes.
    path = build_checkpoint("mixtral", tmp_path / "long", int(torch.randint(0, 2**31, ())),
                            max_position_embeddings=100_000)
    server = cluster.expert_server(path)
    gateway = cluster.gateway(path, [server], max_new_tokens=60_000, same_host_calls=False,
                              batching=BatchingConfig(max_running_requests=1, max_queued_requests=1))
    scheduler = cluster.servicers[gateway].scheduler
    prompts = random_prompts(160, [5, 3, 4])
    busy = threading.Event()
    cluster.expert_servicers[server].executor.submit(busy.wait, 60)
    with GatewayClient(gateway, timeout=120) as client, ThreadPoolExecutor(2) as pool:
        try:
            long_stream = client.generate(prompts[0], max_new_tokens=50_000, ignore_eos=True)
            first = pool.submit(next, long_stream)  # admitted; its first step waits on the busy server
            wait_for(lambda: stuck_calls(cluster, server) > 0, "the long request's first step")
            second = client.generate(prompts[1], max_new_tokens=6, ignore_eos=True)
            second_first = pool.submit(next, second)
            wait_for(lambda: len(scheduler._waiting) == 1, "the second request to queue")
            with pytest.raises(grpc.RpcError) as err:
                list(client.generate(prompts[2], max_new_tokens=4))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-queued-requests 1" in err.value.details()
        finally:
            busy.set()
        assert first.result(60).generated_tokens == 1
        long_stream.close()  # the client leaves after one token: its slot must go to the queued request
        got = [second_first.result(60).token_id] + [t.token_id for t in second]
        assert got == reference_greedy(path, prompts[1], 6)
        wait_for(lambda: scheduler.active == 0, "the cancelled stream to leave")
        third = [t.token_id for t in client.generate(prompts[2], max_new_tokens=4, ignore_eos=True)]
    assert third == reference_greedy(path, prompts[2], 4)
