"""Expert servers merge concurrent RunExperts calls of a layer into one computation, and each call
gets its own rows; several gateways share the servers."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from moe_client import GatewayClient
from moe_serve.core.routing import route
from moe_serve.expert_server.bank import ExpertBank
from moe_serve.expert_server.merger import CallMerger
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.placement import resolve_ownership
from tests.support.references import reference_forward
from tests.support.threads import concurrently


def random_call(layer: int, tokens: int, owned: list[int], num_experts: int = 8, hidden: int = 64):
    """A RunExperts call's tensors: top-2 routing over all experts, slots of experts not owned set to -1."""
    weights, ids = route(torch.randn(tokens, num_experts), 2, True)
    ids = torch.where(torch.isin(ids, torch.tensor(owned)), ids, -1).to(torch.int32)
    return layer, torch.randn(tokens, hidden), ids, weights


@pytest.mark.parametrize("merge", [True, False])
def test_queued_calls_of_a_layer_share_one_computation(tiny_checkpoint, merge):
    checkpoint = Checkpoint(tiny_checkpoint)
    owned = list(range(2, 8))
    bank = ExpertBank.load(checkpoint, resolve_ownership(checkpoint.spec, "2-7"), [torch.device("cpu")],
                           torch.float32)
    executor = ThreadPoolExecutor(1)
    merger = CallMerger(bank, executor, merge=merge)
    calls = [random_call(layer, n, owned) for layer, n in [(0, 5), (1, 3), (0, 1), (0, 17), (1, 8), (0, 2)]]

    async def main():
        busy = threading.Event()
        executor.submit(busy.wait, 30)  # every call below queues while the bank is busy
        tasks = [asyncio.ensure_future(merger.run(*c, torch.float32, lambda out: out.clone())) for c in calls]
        await asyncio.sleep(0)  # let every call reach the queue
        busy.set()
        return await asyncio.gather(*tasks)

    try:
        results = asyncio.run(main())
    finally:
        executor.shutdown()
    # Merged: the four layer-0 calls in one computation, the two layer-1 calls in another.
    assert merger.computations == (2 if merge else len(calls))
    assert merger.merged_calls == (len(calls) if merge else 0)
    for (layer, hidden, ids, weights), (out, seconds) in zip(calls, results, strict=True):
        alone = bank.compute(layer, hidden, ids, weights)
        assert out.shape == hidden.shape and seconds > 0
        assert (out - alone).abs().max() <= 1e-5


def test_merger_respects_its_token_budget_and_passes_errors(tiny_checkpoint):
    checkpoint = Checkpoint(tiny_checkpoint)
    bank = ExpertBank.load(checkpoint, resolve_ownership(checkpoint.spec, None), [torch.device("cpu")], torch.float32)
    executor = ThreadPoolExecutor(1)
    merger = CallMerger(bank, executor, max_tokens=10)
    calls = [random_call(0, n, list(range(8))) for n in (6, 4, 3, 12)]
    calls.insert(1, random_call(0, 3, list(range(8))))  # merged with the 6-token call below, and fails alone

    def finish(out):
        if out.shape[0] == 3:
            raise ValueError("encoding failed for the 3-token call")
        return out.clone()

    async def main():
        busy = threading.Event()
        executor.submit(busy.wait, 30)
        tasks = [asyncio.ensure_future(merger.run(*c, torch.float32, finish)) for c in calls]
        await asyncio.sleep(0)
        busy.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        executor.shutdown()
    # 6+3 tokens (4 more would pass the budget), then 4+3, then 12 alone (over the budget by itself).
    assert merger.computations == 3 and merger.merged_calls == 4
    assert isinstance(results[1], ValueError) and isinstance(results[3], ValueError)  # the two 3-token calls
    for i in (0, 2, 4):
        layer, hidden, ids, weights = calls[i]
        assert (results[i][0] - bank.compute(layer, hidden, ids, weights)).abs().max() <= 1e-5


def test_two_gateways_share_the_expert_servers(cluster, tiny_checkpoint):
    servers = [cluster.expert_server(tiny_checkpoint, experts=e) for e in ("0-4", "5-7")]
    gateways = [cluster.gateway(tiny_checkpoint, servers) for _ in range(2)]
    rng = np.random.default_rng()
    inputs = [rng.standard_normal((n, 64), dtype=np.float32) for n in (3, 9, 1, 24, 6, 14, 2, 11)]
    clients = [GatewayClient(g) for g in gateways]
    try:
        outs = concurrently(lambda i: clients[i % 2].forward(inputs[i]), list(range(len(inputs))))
    finally:
        for c in clients:
            c.close()
    for x, got in zip(inputs, outs, strict=True):
        assert np.abs(got - reference_forward(tiny_checkpoint, x)).max() <= 1e-5
