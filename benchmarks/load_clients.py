"""Closed-loop load on a gateway: N concurrent clients, each sending its next request when the last one
ends, for a fixed window; every request's outcome is counted, none is left behind.

Requests start only inside the window; those still running at its end are waited for, up to a drain
limit, and counted as unfinished past it. Throughput is every token delivered over the time from the
start to the last delivery: with 128 clients one round of requests can outlast a short window, and
counting only what lands inside it would measure the start-up (every prompt at once) rather than the
serving rate. Latency is that of every finished request.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np

from moe_client import wire
from moe_client.channel import insecure_aio_channel
from moe_client.pb import experts_pb2, experts_pb2_grpc, gateway_pb2, gateway_pb2_grpc


@dataclass
class LoadResult:
    """One (RPC, concurrency) cell."""

    clients: int
    window: float
    start: float = field(default_factory=time.perf_counter)
    last: float = 0.0  # when the last token (Generate) or reply (Forward) arrived
    tokens: int = 0  # generated (Generate) or processed (Forward), every request counted
    latencies: list[float] = field(default_factory=list)  # seconds, every finished request started in the window
    first_token: list[float] = field(default_factory=list)  # Generate: seconds to the first token
    expert_share: list[float] = field(default_factory=list)  # the gateway's expert wait / its total, per request
    outcomes: Counter = field(default_factory=Counter)  # "ok", an error code name, or "unfinished"
    cpu_ms_per_token: dict[str, float] = field(default_factory=dict)  # process role -> CPU ms per token

    def deliver(self, tokens: int) -> None:
        """Count tokens that just arrived."""
        self.tokens += tokens
        self.last = time.perf_counter()

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / (self.last - self.start) if self.last > self.start else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    @property
    def issued(self) -> int:
        return sum(self.outcomes.values())


async def _run(clients: int, window: float, drain: float, one) -> LoadResult:
    result = LoadResult(clients, window)
    end = result.start + window

    async def client(index: int) -> None:
        n = 0
        while time.perf_counter() < end:
            began = time.perf_counter()
            try:
                await one(index, n, began, result)
                result.latencies.append(time.perf_counter() - began)
                result.outcomes["ok"] += 1
            except grpc.aio.AioRpcError as err:
                result.outcomes[err.code().name] += 1
            except asyncio.CancelledError:
                result.outcomes["unfinished"] += 1
                raise
            n += 1

    tasks = [asyncio.ensure_future(client(i)) for i in range(clients)]
    done, pending = await asyncio.wait(tasks, timeout=window + drain)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            raise task.exception()
    return result


def generate_load(address: str, clients: int, window: float, prompt_len: int, new_tokens: int, vocab: int,
                  drain: float = 60.0, seed: int = 0) -> LoadResult:
    """`clients` concurrent greedy Generate streams of `new_tokens` after random `prompt_len`-token prompts."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, vocab, (clients, 64, prompt_len)).tolist()

    async def main() -> LoadResult:
        async with insecure_aio_channel(address) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)

            async def one(index: int, n: int, began: float, result: LoadResult) -> None:
                request = gateway_pb2.GenerateRequest(prompt_token_ids=prompts[index][n % 64],
                                                      max_new_tokens=new_tokens, ignore_eos=True)
                reply = None
                async for message in stub.Generate(request, timeout=window + drain):
                    now = time.perf_counter()
                    if reply is None:
                        result.first_token.append(now - began)
                    reply = message
                    result.deliver(1)
                if reply is not None and reply.total_seconds > 0:
                    result.expert_share.append(reply.expert_seconds / reply.total_seconds)

            return await _run(clients, window, drain, one)

    return asyncio.run(main())


def forward_load(address: str, clients: int, window: float, shape: tuple[int, ...], drain: float = 60.0,
                 seed: int = 0) -> LoadResult:
    """`clients` concurrent Forward requests of random hidden states of `shape`."""
    rng = np.random.default_rng(seed)
    inputs = [wire.encode(rng.standard_normal(shape, dtype=np.float32)) for _ in range(8)]
    tokens = int(np.prod(shape[:-1]))

    async def main() -> LoadResult:
        async with insecure_aio_channel(address) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)

            async def one(index: int, n: int, began: float, result: LoadResult) -> None:
                reply = await stub.Forward(gateway_pb2.ForwardRequest(hidden=inputs[(index + n) % 8]),
                                           timeout=window + drain)
                result.deliver(tokens)
                if reply.total_seconds > 0:
                    result.expert_share.append(reply.expert_seconds / reply.total_seconds)

            return await _run(clients, window, drain, one)

    return asyncio.run(main())


def run_experts_load(address: str, callers: int, window: float, tokens: int, hidden: int, num_experts: int,
                     top_k: int, owned: list[int], drain: float = 30.0, seed: int = 0) -> LoadResult:
    """`callers` concurrent RunExperts calls of `tokens` tokens each to one expert server (as many gateways
    would send): layer 0, random routing, slots of experts the server does not own set to -1."""
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(8):
        ids = np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(tokens)]).astype(np.int32)
        ids[~np.isin(ids, owned)] = -1
        requests.append(experts_pb2.RunExpertsRequest(
            layer=0, hidden=wire.encode(rng.standard_normal((tokens, hidden), dtype=np.float32)),
            expert_ids=wire.encode(ids), weights=wire.encode(rng.random((tokens, top_k), dtype=np.float32))))

    async def main() -> LoadResult:
        async with insecure_aio_channel(address) as channel:
            stub = experts_pb2_grpc.ExpertServiceStub(channel)

            async def one(index: int, n: int, began: float, result: LoadResult) -> None:
                await stub.RunExperts(requests[(index + n) % 8], timeout=window + drain)
                result.deliver(tokens)

            return await _run(callers, window, drain, one)

    return asyncio.run(main())
